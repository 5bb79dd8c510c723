"""Long jobs check what they need in their first seconds, the Makefile's
targets make it first, and a run that stops keeps what it measured."""

import json
import pathlib
import re
import shutil
import time

import pytest

from calm_jax import errors
from calm_jax.jobs import bench as bench_job
from calm_jax.jobs import preflight
from calm_jax.jobs import report as report_job
from calm_jax.jobs import validity as validity_job

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_state(tiny_model_dir, tmp_path):
  """A model dir as `make demo` leaves it: trained, no exit classifier."""
  model_dir = tmp_path / 'model'
  shutil.copytree(tiny_model_dir, model_dir)
  shutil.rmtree(model_dir / 'classifier')
  shutil.rmtree(model_dir / 'classifier.manifests')
  return str(model_dir)


def _recipes() -> dict[str, str]:
  """Makefile target -> its recipe, continuation lines joined, with make's
  variables read as the commands they stand for."""
  text = (ROOT / 'Makefile').read_text().replace('\\\n', ' ')
  recipes, target = {}, None
  for line in text.splitlines():
    found = re.match(r'^([\w-]+):', line)
    if found:
      target = found.group(1)
      recipes[target] = ''
    elif line.startswith('\t') and target:
      recipes[target] += ' ' + line.strip()
  return {
    name: re.sub(r'\s+', ' ', recipe)
    .replace('$(MAKE) ', 'make ')
    .replace('$(PY) -m ', '')
    for name, recipe in recipes.items()
  }


def _target_needs(model_dir: str) -> dict[str, list[preflight.Need]]:
  """Each documented long target's job's needs, with its Makefile defaults
  and the demo model dir."""
  return {
    'bench': bench_job.needs(bench_job.MODELS, bench_job.MEASURES, model_dir),
    'reproduce': report_job.needs(model_dir),
    'validity': validity_job.needs(model_dir, 'softmax'),
    'bench-exact': [],  # the demo's rows read no classifier (softmax draft)
  }


def test_each_target_makes_what_its_job_needs_after_make_demo(demo_state):
  recipes = _recipes()
  unmet = {}
  for target, needs in _target_needs(demo_state).items():
    assert target in recipes, target
    for need in needs:
      if not need.met:
        unmet.setdefault(target, []).append(need.what)
        assert need.made_by in recipes[target], (target, need.made_by)
  # The demo leaves no classifier: bench and reproduce train it first.
  assert sorted(unmet) == ['bench', 'reproduce']


def test_the_bench_refuses_in_its_first_seconds_and_writes_nothing(
  demo_state, tmp_path
):
  output = tmp_path / 'bench' / 'bench.json'
  start = time.perf_counter()
  with pytest.raises(errors.SettingError) as raised:
    bench_job.bench(demo_model_dir=demo_state, output=str(output))
  assert time.perf_counter() - start < 5
  message = errors.first_line(raised.value)  # gin adds its call below
  assert message.startswith(
    f'the bench needs an exit classifier in {demo_state}; make it first with '
    '`python -m calm_jax.train --gin_file=gin/runs/train_classifier.gin'
  )
  assert not output.parent.exists()
  # Without the classifier measure it needs nothing more.
  assert not [
    n
    for n in bench_job.needs(['demo'], ['softmax', 'state'], demo_state)
    if not n.met
  ]


def test_the_report_refuses_before_loading(demo_state):
  with pytest.raises(errors.SettingError, match='exit classifier in'):
    report_job.measure(
      demo_state,
      'unused.md',
      ['synth_qa'],
      cal_examples=2,
      test_examples=2,
      timing_examples=2,
    )


def _fake_case(batch, measure, pattern):
  return {
    'model': 'fake',
    'dtype': 'float32',
    'batch_size': batch,
    'pattern': pattern,
    'confidence': measure,
    'avg_layers': 1.0,
    'layer_ideal_speedup': 8.0,
    'flops_ideal_speedup': 4.0,
    'measured_speedup': 2.0,
    'efficiency': 0.5,
    'static_median_s': 0.2,
    'early_median_s': 0.1,
  }


def test_a_bench_that_fails_mid_run_keeps_the_cases_it_finished(
  monkeypatch, tmp_path
):
  """The third case fails: bench.json holds the first two, marked partial."""
  calls = []

  def run_case(bench, batch, measure, pattern, static, repeats, **kwargs):
    calls.append(pattern)
    if len(calls) == 3:
      raise RuntimeError('the machine went away')
    return _fake_case(batch, measure, pattern)

  model = bench_job.BenchModel('fake', None, None, 4, (1.0,), 'fake')
  monkeypatch.setattr(bench_job, 'paper_small_model', lambda *a: model)
  monkeypatch.setattr(bench_job, 'with_dtype', lambda bench, dtype: bench)
  monkeypatch.setattr(bench_job, 'encoded_context', lambda *a: None)
  monkeypatch.setattr(bench_job, 'loop_runner', lambda *a: None)
  monkeypatch.setattr(bench_job, 'run_case', run_case)
  output = tmp_path / 'bench.json'
  with pytest.raises(RuntimeError, match='went away'):
    bench_job.bench(
      models=['paper_small'],
      measures=['softmax'],
      patterns=['exit@1', 'exit@2', 'mixed'],
      batch_sizes=[1],
      demo_model_dir=str(tmp_path / 'none'),
      output=str(output),
    )
  saved = json.loads(output.read_text())
  assert saved['complete'] is False
  assert [c['pattern'] for c in saved['cases']] == ['exit@1', 'exit@2']
  assert (
    'Partial: the run stopped after 2 cases'
    in (tmp_path / 'bench.md').read_text()
  )
