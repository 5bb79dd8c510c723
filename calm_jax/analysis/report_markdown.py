"""Renders docs/REPRODUCTION.md from the results of calm_jax.report.

Pure formatting: every number comes from the results dict of the run that
calls it. No TensorFlow, no gin.
"""

import datetime
import json
import math
import os
from typing import Sequence

import numpy as np

from calm_jax.analysis import split_protocol

# The paper's tasks the embedded ones stand in for, and its figures for
# them (the paper's Table 2: softmax, textual consistency, delta 0.25).
PAPER = {
  'synth_summarize': ('CNN/DM', 2.62, 2.57),
  'synth_translate': ('WMT15 EN-FR', 1.76, 2.83),
  'synth_qa': ('SQuAD', 1.03, 1.88),
}
MEASURE_NAMES = {
  'softmax': 'softmax',
  'state': 'hidden-state saturation',
  'classifier': 'learned classifier',
}


def _fmt(value, digits: int = 2) -> str:
  if value is None:
    return 'none'
  if isinstance(value, float) and math.isnan(value):
    return 'n/a'
  return f'{value:.{digits}f}'


def _row(cells: Sequence) -> str:
  return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A markdown table."""
  lines = [_row(header), _row(['---'] * len(header))]
  return '\n'.join(lines + [_row(r) for r in rows])


def _settings_key(row: dict) -> tuple:
  return (row['consistency'], row['delta'])


def _find(rows, **match) -> dict:
  return next(r for r in rows if all(r[k] == v for k, v in match.items()))


def table2(results: dict) -> str:
  """Average layers, FLOPs ratio and speed-up per (task, measure) and
  (consistency, delta); then quality and test risk in the same shape."""
  rows = results['table']
  settings = sorted(
    {_settings_key(r) for r in rows}, key=lambda s: (s[0] != 'textual', s[1])
  )
  header = ['task', 'measure'] + [f'{c} δ={d:g}' for c, d in settings]
  speed_rows, quality_rows = [], []
  n = results['settings']['test_examples']
  for task in results['tasks']:
    for measure in MEASURE_NAMES:
      cells = [
        _find(rows, task=task, measure=measure, consistency=c, delta=d)
        for c, d in settings
      ]
      speed_rows.append(
        [task, measure]
        + [
          f'{_fmt(r["avg_layers"])} · x{_fmt(r["flops_ratio"])} · '
          f'x{_fmt(r["speedup"])}'
          for r in cells
        ]
      )
      quality_rows.append(
        [task, measure]
        + [
          f'{_fmt(r["quality"], 1)} ({_fmt(r["test_risk"], 3)}); '
          f'λ {_fmt(r["threshold"])}'
          for r in cells
        ]
      )
  return (
    'Each cell: average decoder layers per token · decoder FLOPs '
    'ratio (full / early exit, confidence heads included) · measured '
    'wall-clock speed-up at batch 1.\n\n'
    + table(header, speed_rows)
    + '\n\nThe same cells: test quality (headline metric) with the '
    'test risk of the calibrated consistency in parentheses, and the '
    'certified threshold λ ("none": nothing certified, full model). '
    'The promise is about the risk on new data: with probability '
    f'1 - ε it is at most δ. A test risk measured on {n} examples '
    'carries sampling noise (one standard error at risk 0.25: '
    f'{math.sqrt(0.25 * 0.75 / n):.3f}), so a cell may exceed its δ '
    'by that much; the validity section measures the promise over '
    'many splits.\n\n' + table(header, quality_rows)
  )


def full_depth_table(results: dict) -> str:
  rows = []
  for task in results['tasks']:
    full = _find(results['table'], task=task, measure='softmax')
    oracle = results['analyses']['oracle'][task]
    rows.append(
      [
        task,
        full['metric'],
        _fmt(full['full_quality'], 1),
        _fmt(oracle['avg_layers']),
        _fmt(oracle['quality'], 1),
      ]
    )
  return table(
    [
      'task',
      'metric',
      'full model (8 layers)',
      'oracle avg layers',
      'oracle quality',
    ],
    rows,
  )


def ablation_table(results: dict) -> str:
  rows = []
  for task, by_exits in results['analyses']['ablation'].items():
    for exits, modes in by_exits.items():
      rows.append(
        [task, exits.replace('_', ' '), _fmt(modes['hidden']['avg_layers'])]
        + [
          f'{_fmt(modes[m]["quality"], 1)} / '
          f'{_fmt(modes[m]["agreement_with_full"], 3)}'
          for m in ('hidden', 'kv_copy', 'none')
        ]
      )
  return table(
    [
      'task',
      'exits',
      'avg layers',
      'exit-state copy (CALM)',
      'K/V copy',
      'empty cache',
    ],
    rows,
  )


def decay_table(results: dict) -> str:
  rows = [
    [
      f'{d["task"]} ({d["mean_output_tokens"]:.1f})',
      name.replace('_', ' '),
      _fmt(r['threshold']),
      _fmt(r['avg_layers']),
      _fmt(r['quality'], 1),
      _fmt(r['test_risk'], 3),
      _speed_with_range(r),
    ]
    for d in results['decay']
    for name, r in d.items()
    if isinstance(r, dict)
  ]
  return (
    'Softmax, textual δ = 0.25, each threshold calibrated on its own; '
    'tasks by mean output length (tokens), longest first. Speed-up: '
    'median, with the lowest and highest per-pass ratio; where both '
    'thresholds exit every token at the same layer, the two rows time '
    'the same work and their gap shows the timing noise.\n\n'
    + table(
      [
        'task (mean output tokens)',
        'threshold',
        'certified λ',
        'avg layers',
        'quality',
        'test risk',
        'speed-up',
      ],
      rows,
    )
  )


def _speed_with_range(row: dict) -> str:
  low, high = row.get('speedup_range', (row['speedup'],) * 2)
  return f'x{_fmt(row["speedup"])} ({_fmt(low)}-{_fmt(high)})'


def validity_table(results: dict) -> str:
  rows = [
    [
      r['consistency'],
      f'{r["delta"]:g}',
      _fmt(r['violation_rate']),
      _fmt(r['mean_test_risk'], 3),
      _fmt(r['mean_avg_layers']),
      _fmt(r['certified_fraction']),
    ]
    for r in results['validity']
  ]
  return table(
    [
      'consistency',
      'δ',
      'violation rate',
      'mean test risk',
      'mean avg layers',
      'certified fraction',
    ],
    rows,
  )


def _static_at(results: dict, task: str, layers: float) -> float:
  """Quality of static truncated models at `layers` average layers,
  interpolated between the two neighbouring depths (a mix of the two
  static models spends that many layers on average)."""
  curve = _find(results['analyses']['curves'], task=task, kind='static')
  depths, quality = zip(*sorted(curve['points']))
  return float(np.interp(layers, depths, quality))


def _compare(early: float, static: float) -> str:
  if abs(early - static) < 0.05:
    return 'matched'
  return 'beat' if early > static else 'lost to'


def _propagation_finding(task: str, modes: dict) -> str:
  agreement = {m: modes[m]['agreement_with_full'] for m in modes}
  text = (
    f"- State propagation, `{task}`, at the oracle's exits: "
    f'agreement with the full model {agreement["hidden"]:.3f} '
    f'(exit-state copy) vs {agreement["kv_copy"]:.3f} (K/V copy) vs '
    f'{agreement["none"]:.3f} (empty cache) -> '
  )
  if modes['hidden']['avg_layers'] <= 1.0:
    return text + (
      'not tested: every token exits at layer 1, so no '
      'skipped layer is ever read.'
    )
  if agreement['kv_copy'] < agreement['hidden'] - 0.01:
    return text + 'held: the K/V copy degrades the output.'
  return text + 'not held: the K/V copy does not degrade it here.'


def _early_vs_static_finding(results: dict, task: str) -> str:
  row = _find(
    results['table'],
    task=task,
    measure='softmax',
    consistency='textual',
    delta=0.25,
  )
  paper = PAPER.get(task)
  versus = (
    f' (paper, {paper[0]}: {paper[1]} layers, x{paper[2]} on TPU)'
    if paper
    else ''
  )
  static = _static_at(results, task, row['avg_layers'])
  text = (
    f'- `{task}`, softmax, textual δ = 0.25: {row["avg_layers"]:.2f} '
    f'layers per token, x{row["speedup"]:.2f} wall-clock{versus}; '
    f'quality {row["quality"]:.1f} against {static:.1f} for static '
    'truncated models at the same average depth -> '
  )
  if sum(c > 0 for c in row['exit_layers_histogram']) <= 1:
    return text + 'not tested: every token stops at the same layer.'
  verdict = _compare(row['quality'], static)
  return text + (
    f'{"held" if verdict == "beat" else "not held"}: early exit {verdict} them.'
  )


def _softmax_vs_state_finding(results: dict, task: str) -> str:
  pairs = []
  for consistency, delta in sorted(
    {_settings_key(r) for r in results['table']}
  ):
    layers = {
      m: _find(
        results['table'],
        task=task,
        measure=m,
        consistency=consistency,
        delta=delta,
      )['avg_layers']
      for m in ('softmax', 'state')
    }
    pairs.append((f'{consistency} δ={delta:g}', layers))
  fewer = sum(l['softmax'] < l['state'] for _, l in pairs)
  # Equal layers: both at full depth (nothing certified) or both at one
  # layer; no comparison there.
  tested = sum(l['softmax'] != l['state'] for _, l in pairs)
  cells = ', '.join(
    f'{name}: {l["softmax"]:.2f} vs {l["state"]:.2f}' for name, l in pairs
  )
  verdict = (
    'not tested: equal layers in every setting'
    if not tested
    else 'held'
    if fewer == tested
    else f'held in {fewer} of {tested} settings'
    if fewer
    else 'not held'
  )
  if tested and tested < len(pairs):
    ties = len(pairs) - tested
    verdict += f' (equal layers in {ties} setting{"s" if ties > 1 else ""})'
  return (
    f'- Softmax needs fewer layers than the hidden-state measure at '
    f'the same δ, `{task}` (softmax vs state: {cells}) -> {verdict}.'
  )


def _decay_finding(decay: dict, longest: bool) -> str:
  """The paper's case for the decay is long outputs: on the longest task
  the line is the verdict (held / not held), elsewhere context."""
  constant, decaying = decay['constant'], decay['decaying_tau4']
  changed = (
    abs(decaying['avg_layers'] - constant['avg_layers']) >= 0.01
    or abs(decaying['quality'] - constant['quality']) >= 0.1
  )
  return (
    f'- Decaying threshold (tau 4) on `{decay["task"]}` '
    f'({decay["mean_output_tokens"]:.1f} output tokens): '
    f'{decaying["avg_layers"]:.2f} layers, quality '
    f'{decaying["quality"]:.1f}, x{decaying["speedup"]:.2f} vs '
    f'{constant["avg_layers"]:.2f}, {constant["quality"]:.1f}, '
    f'x{constant["speedup"]:.2f} with a constant threshold'
    + (
      ' (the longest task) -> ' + ('held: ' if changed else 'not held: ')
      if longest
      else ' -> '
    )
    + (
      'it changes layers or quality.'
      if changed
      else 'no change in layers or quality.'
    )
  )


def findings(results: dict) -> str:
  """The paper's claims, each checked against this run's numbers and
  stated as held, not held or not tested."""
  out = []
  eps = results['settings']['epsilon']
  worst = max(r['violation_rate'] for r in results['validity'])
  bound = split_protocol.violation_bound(eps, results['validity'][0]['splits'])
  out.append(
    f'- Calibration keeps its promise (violation rate <= ε = '
    f'{eps:g}; with 50 splits, binomial noise allows up to '
    f'{bound:.2f}): worst violation rate {worst:.2f} -> '
    f'{"held" if worst <= bound else "not held"}.'
  )
  out += [_early_vs_static_finding(results, task) for task in results['tasks']]
  for task, by_exits in results['analyses']['ablation'].items():
    out.append(_propagation_finding(task, by_exits['oracle_exits']))
  out += [_softmax_vs_state_finding(results, task) for task in results['tasks']]
  oracle = [
    results['analyses']['oracle'][t]['avg_layers'] for t in results['tasks']
  ]
  out.append(
    f'- The oracle needs {min(oracle):.2f}-{max(oracle):.2f} '
    'layers per token (paper: about 1.2-1.5).'
  )
  # results['decay'] comes longest task first.
  decay = [
    _decay_finding(d, longest=i == 0) for i, d in enumerate(results['decay'])
  ]
  return '\n'.join(out + decay)


def _shares(histogram: Sequence[int]) -> str:
  """Percent of tokens per exit layer, '·'-separated (layer 1 first)."""
  total = max(sum(histogram), 1)
  return ' · '.join(f'{100 * c / total:.0f}' for c in histogram)


def _busy_layers(histogram: Sequence[int], share: float = 0.05) -> int:
  total = max(sum(histogram), 1)
  return sum(c / total >= share for c in histogram)


def difficulty(results: dict) -> str:
  """How much decoder computation the tokens need: the oracle's and the
  calibrated run's exit layers per task, and whether risk and textual
  consistency certify different thresholds."""
  rows = []
  for task in results['tasks']:
    oracle = results['analyses']['oracle'][task]
    headline = _find(
      results['table'],
      task=task,
      measure='softmax',
      consistency='textual',
      delta=0.25,
    )
    textual = _find(
      results['sweep'],
      task=task,
      measure='softmax',
      consistency='textual',
      delta=0.05,
    )
    risk = _find(
      results['table'],
      task=task,
      measure='softmax',
      consistency='risk',
      delta=0.05,
    )
    rows.append(
      [
        task,
        _fmt(oracle['mean_output_tokens'], 1),
        _fmt(headline['full_quality'], 1),
        _fmt(oracle['avg_layers']),
        _shares(oracle['exit_layers_histogram']),
        _fmt(headline['avg_layers']),
        _shares(headline['exit_layers_histogram']),
        f'{_fmt(textual["threshold"])} / {_fmt(risk["threshold"])}',
      ]
    )
  return (
    'Per token, the oracle stops at the first layer that already '
    "predicts the full model's token: the spread of its exit layers "
    'is how much computation the tokens need. Exit shares are percent '
    'of test tokens at layers 1 to 8; the last column compares the '
    'softmax thresholds certified at δ = 0.05 by textual and by risk '
    'consistency (they differ only where the full model misses '
    'references).\n\n'
    + table(
      [
        'task',
        'output tokens',
        'full quality',
        'oracle layers',
        'oracle exit shares (%)',
        'softmax δ=0.25 layers',
        'its exit shares (%)',
        'λ textual / risk (δ=0.05)',
      ],
      rows,
    )
  )


def _link(path: str, docs: str) -> str:
  """A figure's path as the document links it: relative to its folder
  (the results already hold such paths; an absolute one is converted)."""
  return os.path.relpath(path, docs) if os.path.isabs(path) else path


def _figure(path: str, docs: str, caption: str) -> str:
  return f'![{caption}]({_link(path, docs)})\n\n*{caption}*'


def _introduction(results: dict) -> str:
  s = results['settings']
  today = datetime.date.today().isoformat()
  return f"""# CALM reproduction report (embedded stand-in tasks)

Generated by `make reproduce` ({today}, {results['seconds'] / 60:.1f} min)
from the model dir `{results['model_dir']}` (step
{results['checkpoint_step']}). Every number and figure below comes from that
one run, and running it again rewrites them all (`docs/reproduction.json`
holds the raw numbers).

**These are the embedded stand-in tasks, not the paper's datasets:**
`synth_summarize` stands in for CNN/DailyMail, `synth_translate` for WMT15
EN-FR, `synth_qa` for SQuAD (see docs/tasks.md). Compare trends, not
values. To run the same
report on the paper's tasks, train and calibrate a model with a
`gin/experiments/*.gin` file, then run
`python -m calm_jax.report --gin.MODEL_DIR="'runs/cnn_dailymail'" --gin.TASKS="['cnn_dailymail_v3']"`.

Protocol: thresholds certified by Learn then Test (ε = {s['epsilon']:g},
grid 1.0, 0.95, ..., 0) on {s['cal_examples']} validation examples per task;
quality, layers and FLOPs measured on {s['test_examples']} test examples;
speed-ups compare the full-depth and the early-exit decode of the same
{s['timing_examples']} test inputs at batch 1 after compile, alternating on
every input, medians over {s['timing_repeats']} passes (2-core CPU). FLOPs count the decoder
only (the encoder is the same work for both)."""


def _figures(results: dict, docs: str) -> str:
  figs = results['figures']
  captions = (
    (
      'layers_speedup',
      'Average decoder layers and measured speed-up vs '
      'delta (textual consistency), per confidence measure',
    ),
    (
      'risk',
      'Test risk vs delta with the line risk = delta, and the '
      'violation rate vs epsilon',
    ),
    (
      'quality',
      'Quality vs average layers: early exit (threshold sweep) '
      'against static models truncated at layer k',
    ),
    ('histogram', 'Exit layers per task (softmax, textual delta 0.25)'),
  )
  parts = [_figure(figs[name], docs, caption) for name, caption in captions]
  parts += [
    _figure(png, docs, f'Exit map, {task} (interactive: {_link(html, docs)})')
    for task, (html, png) in results['exit_maps'].items()
  ]
  return '## Figures\n\n' + '\n\n'.join(parts)


def exact_mode_section(docs: str) -> str:
  """The exact mode next to Table 2: docs/exact_mode.json (make
  bench-exact), when it exists."""
  path = os.path.join(docs, 'exact_mode.json')
  if not os.path.exists(path):
    return (
      '## Exact mode\n\nNot measured yet: `make bench-exact` writes '
      'docs/exact_mode.json.'
    )
  with open(path, encoding='utf-8') as f:
    demo = json.load(f).get('demo')
  if not demo:
    return '## Exact mode\n\nNo demo model was measured.'
  rows = [
    (
      r['examples'],
      r['batch_size'],
      f'x{r["calm_speedup"]:.2f}',
      f'x{r["exact_speedup"]:.2f}',
      f'{r["acceptance_rate"]:.2f}',
      f'{r["tokens_per_pass"]:.2f}',
    )
    for r in demo['speed']
  ]
  differing = sum(r['differing_outputs'] for r in demo['exactness'])
  outputs = sum(r['inputs'] for r in demo['exactness'])
  return (
    "## Exact mode\n\nThe full model's own output, drafted by the same "
    'early exit (δ = 0.25 softmax) and verified by one full-depth pass per '
    f'round: {differing} of {outputs} greedy outputs differ from the static '
    "decoder's (all batch sizes). Speed-ups against full depth, measured "
    'in turns with CALM ([exact_mode.md](exact_mode.md)):\n\n'
    + table(
      ('task', 'batch', 'CALM', 'exact mode', 'acceptance', 'tokens per pass'),
      rows,
    )
  )


def render(results: dict, docs: str) -> str:
  """The whole markdown document."""
  sections = [
    _introduction(results),
    "## The paper's findings, re-measured\n\n" + findings(results),
    '## How much computation the tokens need\n\n' + difficulty(results),
    "## Table 2, in the paper's shape\n\n" + table2(results),
    exact_mode_section(docs),
    '## Full model and oracle\n\nThe oracle exits each token at the '
    "first layer whose prediction equals the\nfull model's, so its "
    "outputs are the full model's.\n\n" + full_depth_table(results),
    '## State propagation (quality / agreement with the full model)\n\n'
    'Every mode decodes with the same exit layers per token (forced): the\n'
    "oracle's (a mix of layers) and the calibrated softmax run's "
    "(δ = 0.25).\nSkipped layers' caches get the exit state's K/V "
    '(CALM), the K/V of the last\ncomputed layer copied (the ablation the '
    'paper found to collapse), or\nnothing. Agreement = 1 - textual '
    'consistency loss.\n\n' + ablation_table(results),
    '## Decaying versus constant threshold\n\n' + decay_table(results),
    '## Calibration validity (50 random 80/20 splits of the pooled '
    'validation data, softmax)\n\n' + validity_table(results),
    _figures(results, docs),
  ]
  return '\n\n'.join(sections) + '\n'
