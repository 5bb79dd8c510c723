"""docs/tpu_plan.md from the plans `make tpu-plan` wrote (no JAX)."""

import re
from typing import Any
from typing import Mapping

from calm_jax.planning import chips

GIB = float(1 << 30)

HEADER = """# TPU plan

Written by `make tpu-plan` (tools/tpu_plan.py) from runs of the planner
(`calm_jax.plan`): every program compiled for the TPU topology named, on a
CPU machine, by the TPU compiler (libtpu). Memory is the compiler's per-device memory
analysis (arguments + outputs - aliased + temporaries + code) against the
chip's HBM; FLOPs and bytes are its per-device cost analysis, which
counts a loop's body once: the iterations of the streamed loss's loop
over the exits it leaves out are compiled alone and added. The fused exit
loss (`exit_loss` 'auto' on TPU, embeddings up to 2048) has no such loop;
XLA cannot see into its Pallas kernels, which declare their own FLOPs and
the HBM bytes of their block schedule (counted from the tiling, not
measured). A step with its
layers scanned (`SCAN_LAYERS`) reports the unrolled step's FLOPs and bytes,
extrapolated from unrolled compiles at depth 1 and 2 of each stack (its
memory is the scanned program's own).

**Every time below is a roofline lower bound, not a timing**: max(FLOPs /
peak bf16 FLOP/s, bytes accessed / HBM bandwidth) per device, from the chip
table in `calm_jax/planning/chips.py`. It leaves out interconnect
collectives, per-op and loop overheads and the host. "MFU" is 6 N tokens
over (devices x peak x that bound): an upper bound on the real MFU.

Where the roofline misleads: small models at batch 1 are bound by per-op
and loop overheads (launch, `while` and `switch` control, tiny matmuls far
below an MXU tile), not by bandwidth, so their bound is far below what a
chip would take, and speed-up predictions from it assume that overhead is
the same for every exit layer. The predictions take the measured exit
histograms as given, draw the rows of a batch independently from them, and
charge a position the cost of its deepest row (the bucketed loop runs a
layer while any row climbs; at a memory-bound batch a layer costs about the
same on any number of rows). The same method on per-token times measured
on this CPU is set against the CPU's measured speed-ups in
[cpu_prediction_check.md](cpu_prediction_check.md).
"""


def _gib(n) -> str:
  return f'{n / GIB:.2f}'


def _ms(seconds) -> str:
  return f'{seconds * 1e3:.3g}'


def _program_rows(reports) -> list[str]:
  rows = [
    '| program | mesh | compile s | args GiB | temp GiB | total GiB '
    '| HBM GiB | headroom GiB | TFLOP | GB accessed | bound ms | bound by '
    '| MFU bound |',
    '|' + '---|' * 13,
  ]
  for r in reports:
    mfu = r.get('roofline_mfu')
    rows.append(
      f'| {r["name"]} | {tuple(r.get("mesh", ()))} | '
      f'{r["compile_seconds"]:.0f} | {_gib(r["argument_bytes"])} | '
      f'{_gib(r["temp_bytes"])} | {_gib(r["total_bytes"])} | '
      f'{_gib(r["hbm_bytes"])} | {_gib(r["headroom_bytes"])} | '
      f'{r["flops"] / 1e12:.3g} | {r["bytes_accessed"] / 1e9:.3g} | '
      f'{_ms(r["roofline_seconds"])} | {r["bound"]} | '
      f'{"" if mfu is None else f"{mfu:.1%}"} |'
    )
  return rows


def _checks(reports) -> list[str]:
  out = []
  for r in reports:
    if r['kind'] != 'decode':
      continue
    out.append(
      f'- {r["name"]}: {len(r["loop_host_transfers"])} host transfers and '
      f'{len(r["loop_cache_copies"])} copies of a K/V cache array inside '
      f'its loops; {len(r["loop_cache_moves"])} moves of one between '
      'memory spaces (HBM and on-chip memory, chosen by the '
      "compiler's memory-space assignment)" + _copied(r['loop_cache_copies'])
    )
  return out


# An HLO copy line: `%copy.3 = bf16[8,53,4,32]{1,3,2,0:T(8,128)S(1)} copy(`.
_COPY = re.compile(r'= (\w+\[[\d,]*\])\{[^}]*?(?:S\((\d+)\))?\}')


def _copied(lines) -> str:
  """What the first in-loop copy copies: its shape and memory space."""
  if not lines:
    return ''
  found = _COPY.search(lines[0])
  if not found:
    return ''
  return (
    f'; the copies are of `{found.group(1)}` within memory space '
    f'{found.group(2) or 0} (its operand in the same space)'
  )


def _traffic(reports) -> list[str]:
  """Where each train step's bytes go: its largest sources."""
  out = []
  for r in reports:
    if r['kind'] != 'train' or not r.get('traffic'):
      continue
    sources = '; '.join(
      f'{t["what"]} {t["bytes"] / 1e9:.3g} GB' for t in r['traffic']
    )
    out.append(
      f'- {r["name"]}, bytes by source (a loop body once, as the cost '
      f'analysis counts it): {sources}'
    )
  return out


def _token_rows(costs: Mapping[str, Any]) -> list[str]:
  rows = [
    '| batch | program | GFLOP | MB accessed | bound us |',
    '|---|---|---|---|---|',
  ]
  for batch, c in costs.items():
    rows.append(
      f'| {batch} | full depth | {c["full"]["flops"] / 1e9:.3g} | '
      f'{c["full"]["bytes_accessed"] / 1e6:.3g} | '
      f'{c["full"]["roofline_seconds"] * 1e6:.3g} |'
    )
    for measure, layers in c['exits'].items():
      for k, f in layers.items():
        rows.append(
          f'| {batch} | {measure}, exit after layer {k} | '
          f'{f["flops"] / 1e9:.3g} | {f["bytes_accessed"] / 1e6:.3g} | '
          f'{f["roofline_seconds"] * 1e6:.3g} |'
        )
    v = c['verify']
    rows.append(
      f'| {batch} | verify pass, {v["gamma"] + 1} positions | '
      f'{v["flops"] / 1e9:.3g} | {v["bytes_accessed"] / 1e6:.3g} | '
      f'{v["roofline_seconds"] * 1e6:.3g} |'
    )
  return rows


def _prediction_rows(predictions) -> list[str]:
  rows = [
    '| exits measured | batch | CALM speed-up bound | exact-mode round / '
    'full-depth token | tokens per pass measured | exact-mode speed-up |',
    '|---|---|---|---|---|---|',
  ]
  for p in predictions:
    e = p['exact']
    per_pass = e['tokens_per_pass']
    speedup = e['speedup']
    rows.append(
      f'| {p["label"]} | {p["batch_size"]} | '
      f'x{p["calm_speedup_bound"]:.2f} | '
      f'{e["break_even_tokens_per_pass"]:.2f} | '
      + ('-' if per_pass is None else f'{per_pass:.2f}')
      + ' | '
      + ('-' if speedup is None else f'x{speedup:.2f}')
      + ' |'
    )
  return rows


def _train_settings(plan: Mapping[str, Any]) -> str:
  """One line: what the train steps were planned at (plans made before a
  setting existed ran at its default; before the fused exit loss, every
  step streamed)."""
  settings = plan['settings']
  dims = settings.get('parameter_partitioning_dims', 1)
  return (
    f'Train steps: global batch {settings["train_batch_size"]}, lengths '
    f'{settings["input_length"]}/{settings["target_length"]}, '
    f'{"packed" if settings.get("pack") else "unpacked"}, parameters split '
    f'{"over model and data (2D)" if dims == 2 else "over model"}, remat '
    f'{plan.get("remat_policy", "none")}, layers '
    f'{"scanned" if plan.get("config", {}).get("scan_layers") else "unrolled"}'
    f', exit loss {plan.get("exit_loss", "streamed")}.\n'
  )


# What a refusal says a program needs per device: the planner's own line
# ('it needs 20.1 GiB per device') or the compiler's ('Used 20.1G of ...',
# 'required for HLO temporaries (20.1G) exceeds').
_NEEDS = re.compile(
  r'it needs ([\d.]+) GiB|[Uu]sed ([\d.]+)G of|\(([\d.]+)G\) exceeds'
)


def _devices(topology: str) -> int:
  return chips.parse_topology(topology).num_chips


def _matrix(results, kind: str) -> dict:
  """{size: {column: result}} of the sizes matrix's cases of a kind."""
  out: dict = {}
  for plan in results.values():
    matrix = plan.get('matrix') or {}
    if matrix.get('kind') != kind:
      continue
    column = plan['topology']
    if kind == 'decode':
      column = (plan['topology'], matrix['batch'])
    out.setdefault(matrix['size'], {})[column] = plan
  return out


# The op a compiler error names ('op_name="jit(step)/.../scatter-add"').
_FAILED_OP = re.compile(r'op_name="([^"]+)"')


def _refused_cell(plan) -> str:
  """What stopped a case: the memory a refused program needs, a timeout,
  the op the compiler failed on (a case that ended neither in a plan nor
  in the planner's refusal, exit status 2), or the planner's refusal."""
  needs = _NEEDS.search(plan['error'])
  if needs:
    return f'needs {next(g for g in needs.groups() if g)} GiB'
  if 'not finished' in plan['error']:
    return 'not compiled in time'
  if plan.get('returncode', 2) != 2:
    failed = _FAILED_OP.search(plan['error'])
    op = failed.group(1).rsplit('/', 2)[-2:] if failed else ['see below']
    return 'compiler error: ' + '/'.join(op)
  return 'refused'


def _fit_cell(plan) -> str:
  if 'error' in plan:
    return _refused_cell(plan)
  step = plan['train'][0]
  mfu = step.get('roofline_mfu')
  return f'{_gib(step["total_bytes"])} of {_gib(step["hbm_bytes"])} GiB' + (
    '' if mfu is None else f', MFU <= {mfu:.0%}'
  )


def _fit_table(results) -> list[str]:
  matrix = _matrix(results, 'train')
  if not matrix:
    return []
  topologies = sorted({t for row in matrix.values() for t in row}, key=_devices)
  lines = [
    '## Which sizes fit where: CALM fine-tuning\n',
    "Each size's train step (model stage: every exit's loss) at batch "
    '128, lengths 512/128 (Llama: 640 tokens), packed, layers scanned, '
    'minimal remat, 2D parameter sharding, tried on v5e slices from the '
    'smallest up; a slice above the first that fits is not compiled (-) '
    'except v5e-256. A cell is the memory per device against the HBM and '
    'the roofline MFU bound, or what a refused step needs (for a step the '
    'compiler ran out of memory on, its temporaries alone). Details in the '
    'sections below.\n',
    '| size | ' + ' | '.join(topologies) + ' | planned at |',
    '|---|' + '---|' * (len(topologies) + 1),
  ]
  for size, row in matrix.items():
    cells = [_fit_cell(row[t]) if t in row else '-' for t in topologies]
    lines.append(f'| {size} | ' + ' | '.join([*cells, _commits(row)]) + ' |')
  return lines + ['']


def _commits(row) -> str:
  """The commits a row's cases were planned at ('earlier': before the
  report recorded them)."""
  return ', '.join(sorted({p.get('commit') or 'earlier' for p in row.values()}))


def _decode_cell(plan) -> str:
  if 'error' in plan:
    return _refused_cell(plan)
  (costs,) = plan['token_costs'].values()
  full = costs['full']['roofline_seconds']
  speedups = [p['calm_speedup_bound'] for p in plan.get('predictions', ())]
  exact = [
    p['exact']['break_even_tokens_per_pass']
    for p in plan.get('predictions', ())
  ]
  cell = f'{_ms(full)} ms'
  if speedups:
    cell += f', CALM x{min(speedups):.2f}-{max(speedups):.2f}'
  if exact:
    cell += f', exact breaks even at {min(exact):.2f}-{max(exact):.2f}'
  return cell


def _decode_table(results) -> list[str]:
  matrix = _matrix(results, 'decode')
  if not matrix:
    return []
  columns = sorted(
    {c for row in matrix.values() for c in row},
    key=lambda c: (_devices(c[0]), c[1]),
  )
  lines = [
    '## Decoding across sizes: one position\n',
    "Each size's one-position decode programs (prompt 512, 128 "
    "generated; T5 at the softmax measure and the demo model's exit "
    "histograms, Llama at the classifier measure and SmolLM2's), per "
    "topology and batch. A cell is the full-depth position's roofline "
    'bound, the predicted CALM speed-up bound over the measured '
    'histograms (their range), and the tokens an exact-mode round (gamma '
    'drafts and one verify pass) must emit per verify pass to break '
    'even; or what a refused program needs. Bounds, not timings.\n',
    '| size | '
    + ' | '.join(f'{t} batch {b}' for t, b in columns)
    + ' | planned at |',
    '|---|' + '---|' * (len(columns) + 1),
  ]
  for size, row in matrix.items():
    cells = [_decode_cell(row[c]) if c in row else '-' for c in columns]
    lines.append(f'| {size} | ' + ' | '.join([*cells, _commits(row)]) + ' |')
  return lines + ['']


def render(results: Mapping[str, Mapping[str, Any]]) -> str:
  lines = [HEADER, *_fit_table(results), *_decode_table(results)]
  for name, plan in results.items():
    lines.append(
      f'## {name}: {plan.get("name") or plan.get("model")} on '
      f'{plan.get("topology")}\n'
    )
    if plan.get('note'):
      lines.append(f'{plan["note"]}.\n')
    lines.append(
      f'Planned at commit {plan["commit"]}.\n'
      if plan.get('commit')
      else 'Planned before the report recorded commits (before the '
      'projections wrote bfloat16).\n'
    )
    if 'error' in plan:
      lines.append(f'Refused: {plan["error"]}\n')
      continue
    chip = plan['chip']
    lines.append(
      f'{plan["devices"]} devices; per device {_gib(plan["device_budget"]["hbm_bytes"])} '
      f'GiB HBM, {plan["device_budget"]["peak_flops"] / 1e12:.0f} TFLOP/s, '
      f'{plan["device_budget"]["hbm_bandwidth"] / 1e9:.0f} GB/s ({chip["source"]}).\n'
    )
    if plan['train']:
      lines.append(_train_settings(plan))
    reports = [
      *plan['train'],
      *[r for rs in plan['decode'].values() for r in rs],
    ]
    if reports:
      lines += _program_rows(reports) + ['']
      lines += _checks(reports) + _traffic(reports) + ['']
    if plan['token_costs']:
      lines.append('One decode position (compiled one-step programs):\n')
      lines += _token_rows(plan['token_costs']) + ['']
    if plan.get('predictions'):
      lines.append(
        'Predicted from those bounds at the measured exit histograms. '
        'The exact-mode column "round / full-depth token" is the tokens '
        'a round must emit to break even (gamma drafts at the histogram '
        'plus one verify pass, over one full-depth position):\n'
      )
      lines += _prediction_rows(plan['predictions']) + ['']
  return '\n'.join(lines) + '\n'
