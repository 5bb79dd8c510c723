"""Pictures of early exit: PNG plots (matplotlib, Agg) and HTML exit maps.

Each function takes plain rows (lists of dicts) and writes one file, so the
report, the decode job and tests call them alike. No TensorFlow, no gin.
"""

import html
from typing import Mapping
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from calm_jax.analysis import split_protocol  # pylint: disable=g-import-not-at-top
from calm_jax.storage import files  # pylint: disable=g-import-not-at-top

DPI = 100
# Exit layer -> colour, shared by the PNG and HTML exit maps and histograms.
_CMAP = matplotlib.colormaps['viridis']


def layer_colour(layer: int, num_layers: int) -> str:
  """Hex colour of an exit layer (dark: layer 1, light: the top)."""
  return matplotlib.colors.to_hex(_CMAP((layer - 1) / max(num_layers - 1, 1)))


def _luminance(colour: str) -> float:
  """WCAG relative luminance of a colour."""
  linear = [
    c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    for c in matplotlib.colors.to_rgb(colour)
  ]
  return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(foreground: str, background: str) -> float:
  """WCAG contrast ratio of two colours (1 to 21)."""
  high, low = sorted(
    (_luminance(foreground), _luminance(background)), reverse=True
  )
  return (high + 0.05) / (low + 0.05)


def text_colour(background: str) -> str:
  """Black or white, whichever reads better on `background` (for any
  colour one of them reaches the WCAG AA ratio 4.5:1)."""
  return max(('#000000', '#ffffff'), key=lambda c: contrast(c, background))


def _save(fig, path: str) -> str:
  try:
    return files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI))
  finally:
    plt.close(fig)


def _tasks(rows: Sequence[Mapping]) -> list[str]:
  return sorted({row['task'] for row in rows})


def layers_and_speedup_vs_delta(rows: Sequence[Mapping], path: str) -> str:
  """Rows: task, measure, delta, avg_layers, speedup. One row of panels per
  task: average decoder layers and measured speed-up against delta, one
  line per confidence measure."""
  tasks = _tasks(rows)
  fig, axes = plt.subplots(
    len(tasks), 2, figsize=(10, 3 * len(tasks)), squeeze=False
  )
  for ax_row, task in zip(axes, tasks):
    task_rows = [r for r in rows if r['task'] == task]
    for measure in sorted({r['measure'] for r in task_rows}):
      line = sorted(
        (r['delta'], r['avg_layers'], r['speedup'])
        for r in task_rows
        if r['measure'] == measure
      )
      deltas, layers, speedups = zip(*line)
      ax_row[0].plot(deltas, layers, 'o-', label=measure)
      ax_row[1].plot(deltas, speedups, 'o-', label=measure)
    ax_row[0].set_ylabel(f'{task}\navg decoder layers')
    ax_row[1].set_ylabel('speed-up (x)')
    ax_row[1].axhline(1.0, color='grey', lw=0.8, ls=':')
    for ax in ax_row:
      ax.set_xlabel('delta')
      ax.grid(alpha=0.3)
    ax_row[0].legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def risk_vs_delta(rows: Sequence[Mapping], path: str) -> str:
  """Rows: consistency, delta, mean_test_risk, violation_rate. Test risk
  against delta with the line risk = delta that calibration promises."""
  fig, (risk_ax, rate_ax) = plt.subplots(1, 2, figsize=(10, 4))
  for consistency in sorted({r['consistency'] for r in rows}):
    line = sorted(
      (r['delta'], r['mean_test_risk'], r['violation_rate'])
      for r in rows
      if r['consistency'] == consistency
    )
    deltas, risks, rates = zip(*line)
    risk_ax.plot(deltas, risks, 'o-', label=f'{consistency}: mean test risk')
    rate_ax.plot(deltas, rates, 'o-', label=consistency)
  top = max(r['delta'] for r in rows)
  risk_ax.plot([0, top], [0, top], 'k--', lw=1, label='risk = delta')
  epsilon = rows[0].get('epsilon', 0.05)
  rate_ax.axhline(epsilon, color='k', ls='--', lw=1, label='epsilon')
  splits = rows[0].get('splits')
  if splits:  # what the report judges by: epsilon + 2 binomial deviations
    bound = split_protocol.violation_bound(epsilon, splits)
    rate_ax.axhspan(
      0,
      bound,
      color='tab:green',
      alpha=0.12,
      label=f'within binomial noise of epsilon ({splits} splits)',
    )
    rate_ax.set_ylim(
      0, max(bound, max(r['violation_rate'] for r in rows)) * 1.15
    )
  risk_ax.set(xlabel='delta', ylabel='test risk')
  rate_ax.set(xlabel='delta', ylabel='violation rate (test risk > delta)')
  for ax in (risk_ax, rate_ax):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def quality_vs_layers(curves: Sequence[Mapping], path: str) -> str:
  """Curves: task, kind ('static' or a measure), metric, points [(avg
  layers, quality)]. One panel per task: early exit against static models
  truncated at layer k."""
  tasks = _tasks(curves)
  fig, axes = plt.subplots(
    1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False
  )
  for ax, task in zip(axes[0], tasks):
    for curve in (c for c in curves if c['task'] == task):
      layers, quality = zip(*sorted(curve['points']))
      if curve['kind'] == 'static':
        ax.plot(
          layers,
          quality,
          's--',
          color='k',
          ms=4,
          label='static, exit at layer k',
        )
      else:
        ax.plot(
          layers, quality, 'o-', ms=4, label=f'early exit ({curve["kind"]})'
        )
      ax.set_ylabel(curve['metric'])
    values = [q for c in curves if c['task'] == task for _, q in c['points']]
    ax.set(
      title=task,
      xlabel='avg decoder layers per token',
      ylim=_quality_limits(values),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def _quality_limits(
  values: Sequence[float], least_span: float = 10.0
) -> tuple[float, float]:
  """y limits showing at least `least_span` points of a 0-100 metric, so
  that 99.9 against 100 does not fill the panel like 0 against 100."""
  low, high = min(values), max(values)
  span = max(high - low, least_span)
  bottom = max(0.0, high - 1.08 * span)
  return bottom, min(100.0, high + 0.04 * span) if high <= 100 else high


def exit_histogram(
  exit_layers: Mapping[str, Sequence[int]], num_layers: int, path: str
) -> str:
  """Share of tokens exiting at each layer, one panel per task."""
  tasks = sorted(exit_layers)
  fig, axes = plt.subplots(
    1, len(tasks), figsize=(4 * len(tasks), 3), squeeze=False
  )
  bins = np.arange(1, num_layers + 1)
  for ax, task in zip(axes[0], tasks):
    layers = np.asarray(exit_layers[task])
    share = (
      np.array([(layers == b).mean() for b in bins])
      if len(layers)
      else np.zeros(len(bins))
    )
    ax.bar(bins, share, color=[layer_colour(b, num_layers) for b in bins])
    ax.set(
      title=f'{task} (avg {layers.mean():.2f})' if len(layers) else task,
      xlabel='exit layer',
      ylabel='share of tokens',
      xticks=bins,
    )
  fig.tight_layout()
  return _save(fig, path)


def _token_text(piece: str) -> str:
  """A SentencePiece piece as display text ('▁' marks a word start)."""
  return piece.replace('\u2581', ' ')


def _token_style(layer: int, num_layers: int) -> str:
  background = layer_colour(layer, num_layers)
  return f'color:{text_colour(background)};background:{background}'


def exit_map_html(
  examples: Sequence[Mapping], num_layers: int, title: str
) -> str:
  """An HTML page: each example's output tokens shaded by exit layer, with
  the layer and confidence on hover. Examples: inputs, tokens,
  exit_layers, confidences."""
  legend = ''.join(
    f'<span class="tok" style="{_token_style(l, num_layers)}">{l}</span>'
    for l in range(1, num_layers + 1)
  )
  body = []
  for ex in examples:
    spans = ''.join(
      f'<span class="tok" data-layer="{layer}" '
      f'data-confidence="{"" if conf is None else conf}" '
      f'style="{_token_style(layer, num_layers)}" '
      f'title="layer {layer}, confidence '
      f'{"none (ran through the top layer)" if conf is None else conf}">'
      f'{html.escape(_token_text(piece))}</span>'
      for piece, layer, conf in zip(
        ex['tokens'], ex['exit_layers'], ex['confidences']
      )
    )
    target = (
      f'<div class="tg">target: {html.escape(ex["targets"])}</div>'
      if ex.get('targets') is not None
      else ''
    )
    body.append(
      f'<div class="ex"><div class="in">input: '
      f'{html.escape(ex["inputs"])}</div>{target}'
      f'<div class="out">{spans}</div></div>'
    )
  return (
    '<!DOCTYPE html><html><head><meta charset="utf-8">'
    f'<title>{html.escape(title)}</title><style>'
    'body{font-family:sans-serif;max-width:60em;margin:auto}'
    '.tok{padding:2px 1px;margin:0 1px;border-radius:3px;'
    'white-space:pre}.in,.tg{color:#444;font-size:90%;margin:.2em 0}'
    '.in{margin-top:1em}'
    '.ex{border-bottom:1px solid #ddd;padding-bottom:.6em}'
    f'</style></head><body><h2>{html.escape(title)}</h2>'
    f'<p>Exit layer (1 = first): <span class="legend">{legend}</span>'
    '; hover a token for its layer and confidence.</p>'
    + ''.join(body)
    + '</body></html>\n'
  )


def write_exit_map(
  examples: Sequence[Mapping],
  num_layers: int,
  title: str,
  html_path: str,
  png_path: str,
) -> tuple[str, str]:
  """The HTML exit map and a PNG rendering of it."""
  files.atomic_write_text(html_path, exit_map_html(examples, num_layers, title))
  return html_path, exit_map_png(examples, num_layers, title, png_path)


def exit_map_png(
  examples: Sequence[Mapping],
  num_layers: int,
  title: str,
  path: str,
  width_chars: int = 150,
) -> str:
  """The exit map drawn with matplotlib: a legend of the layer colours,
  then per example its input and target (grey, cut to a line each) and
  one shaded box per output token, its text black or white for contrast."""
  lines = [_wrap(ex, width_chars) for ex in examples]
  texts = [1 + (ex.get('targets') is not None) for ex in examples]
  rows = 2 + sum(len(l) for l in lines) + sum(texts) + len(lines)
  fig = plt.figure(figsize=(10, 0.6 + 0.28 * rows))
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_xlim(0, width_chars)
  ax.set_ylim(rows + 1.5, 0)
  ax.axis('off')
  ax.text(0.5, 0.8, title, fontsize=10, weight='bold')
  ax.text(0.5, 2.0, 'exit layer:', fontsize=8, va='center')
  for layer in range(1, num_layers + 1):
    _token_box(ax, 11.0 + 3.5 * (layer - 1), 2.0, str(layer), layer, num_layers)
  y = 4.0
  for example, example_lines in zip(examples, lines):
    shown = [('input', example['inputs'])]
    if example.get('targets') is not None:
      shown.append(('target', example['targets']))
    for name, text in shown:
      text = ' '.join(text.split())
      cut = width_chars - len(name) - 4
      ax.text(
        0.5,
        y,
        f'{name}: {text[:cut]}{"…" if len(text) > cut else ""}',
        fontsize=8,
        family='monospace',
        color='#444444',
        va='center',
      )
      y += 1
    for line in example_lines:
      for x, text, layer in line:
        _token_box(ax, x + 0.5, y, text, layer, num_layers)
      y += 1
    y += 1
  return _save(fig, path)


def _token_box(
  ax, x: float, y: float, text: str, layer: int, num_layers: int
) -> None:
  background = layer_colour(layer, num_layers)
  ax.text(
    x,
    y,
    text,
    fontsize=8,
    family='monospace',
    color=text_colour(background),
    va='center',
    bbox=dict(boxstyle='round,pad=0.15', lw=0, fc=background),
  )


def _wrap(example: Mapping, width: int) -> list[list[tuple[float, str, int]]]:
  """Tokens placed on lines of `width` monospace characters: [(x, text,
  layer)]; pieces that continue a word sit closer than new words."""
  lines, line, x = [], [], 0.0
  for piece, layer in zip(example['tokens'], example['exit_layers']):
    text = _token_text(piece).strip() or '_'
    new_word = piece.startswith('\u2581') or piece.startswith('<')
    x += (1.5 if new_word else 0.6) if line else 0.0
    if x + len(text) > width and line:
      lines.append(line)
      line, x = [], 0.0
    line.append((x, text, layer))
    x += len(text)
  return lines + [line] if line else lines
