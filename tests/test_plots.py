"""plots.py: every picture is written, non-empty, at its expected size."""

import re
import struct

import pytest

from calm_jax.analysis import plots


def _png_size(path) -> tuple[int, int]:
  with open(path, 'rb') as f:
    header = f.read(24)
  assert header[:8] == b'\x89PNG\r\n\x1a\n'
  return struct.unpack('>II', header[16:24])


def _check_png(path, size):
  assert _png_size(path) == size
  assert path.stat().st_size > 5000  # holds a drawing, not a blank canvas


def test_layers_and_speedup_vs_delta(tmp_path):
  rows = [
    {
      'task': task,
      'measure': measure,
      'delta': delta,
      'avg_layers': 8 - 20 * delta - i,
      'speedup': 1 + 4 * delta + i,
    }
    for task in ('a', 'b')
    for i, measure in enumerate(('softmax', 'state'))
    for delta in (0.1, 0.2, 0.3)
  ]
  path = tmp_path / 'layers.png'
  plots.layers_and_speedup_vs_delta(rows, str(path))
  _check_png(path, (1000, 600))  # 2 tasks x (layers, speed-up) panels


def test_risk_vs_delta(tmp_path):
  rows = [
    {
      'consistency': c,
      'delta': d,
      'mean_test_risk': 0.7 * d,
      'violation_rate': 0.02,
      'epsilon': 0.05,
    }
    for c in ('textual', 'risk')
    for d in (0.05, 0.1, 0.2)
  ]
  path = tmp_path / 'risk.png'
  plots.risk_vs_delta(rows, str(path))
  _check_png(path, (1000, 400))
  banded = tmp_path / 'banded.png'
  plots.risk_vs_delta([dict(r, splits=50) for r in rows], str(banded))
  _check_png(banded, (1000, 400))
  assert banded.read_bytes() != path.read_bytes()  # the noise band is drawn


def test_quality_vs_layers(tmp_path):
  curves = [
    {
      'task': t,
      'kind': 'static',
      'metric': 'bleu',
      'points': [(k, 10 * k) for k in range(1, 9)],
    }
    for t in 'xyz'
  ]
  curves += [
    {
      'task': t,
      'kind': 'softmax',
      'metric': 'bleu',
      'points': [(1.5, 60), (2.5, 80), (4.0, 80)],
    }
    for t in 'xyz'
  ]
  path = tmp_path / 'quality.png'
  plots.quality_vs_layers(curves, str(path))
  _check_png(path, (1500, 400))


def test_exit_histogram(tmp_path):
  path = tmp_path / 'hist.png'
  plots.exit_histogram({'a': [1, 1, 2, 8], 'b': [3, 3, 3]}, 8, str(path))
  _check_png(path, (800, 300))


EXAMPLES = [
  {
    'inputs': 'translate English to French: the red <car> .',
    'tokens': ['\u2581la', '\u2581voiture', '\u2581rouge', '\u2581.', '</s>'],
    'exit_layers': [1, 3, 8, 1, 1],
    'confidences': [0.97, 0.91, 0.42, 0.99, 1.0],
  },
  {
    'inputs': 'question: who ?',
    'tokens': ['\u2581<b>', '</s>'],
    'exit_layers': [2, 1],
    'confidences': [0.8, 0.95],
  },
]


def test_exit_map_html_has_one_element_per_token_with_its_layer():
  page = plots.exit_map_html(EXAMPLES, 8, 'exit map')
  tokens = re.findall(
    r'<span class="tok" data-layer="(\d+)" '
    r'data-confidence="([\d.]+)"[^>]*>([^<]*)</span>',
    page,
  )
  assert [(int(l), float(c)) for l, c, _ in tokens] == [
    (l, c)
    for ex in EXAMPLES
    for l, c in zip(ex['exit_layers'], ex['confidences'])
  ]
  assert [t for _, _, t in tokens][:3] == [' la', ' voiture', ' rouge']
  assert '&lt;b&gt;' in page and '&lt;car&gt;' in page  # text is escaped
  assert 'title="layer 8, confidence 0.42"' in page
  assert plots.layer_colour(1, 8) != plots.layer_colour(8, 8)
  assert f'background:{plots.layer_colour(3, 8)}" title="layer 3' in page


def test_write_exit_map_writes_html_and_png(tmp_path):
  html_path, png_path = plots.write_exit_map(
    EXAMPLES, 8, 'exit map', str(tmp_path / 'm.html'), str(tmp_path / 'm.png')
  )
  page = open(html_path).read()
  assert page.count('data-layer=') == 7
  assert 'input: translate English to French' in page
  width, height = _png_size(png_path)
  # Rows: title and legend (2), per example its input line, its token
  # lines (1 each) and a gap.
  assert width == 1000 and height == pytest.approx(
    100 * (0.6 + 0.28 * (2 + 2 + 2 + 2)), abs=1
  )


def test_exit_maps_show_the_target_and_read_at_aa_contrast(tmp_path):
  example = dict(EXAMPLES[0], targets='la voiture rouge .')
  page = plots.exit_map_html([example], 8, 'map')
  assert 'target: la voiture rouge .' in page
  for layer in range(1, 13):
    for layers in (8, 12):
      if layer > layers:
        continue
      background = plots.layer_colour(layer, layers)
      foreground = plots.text_colour(background)
      assert plots.contrast(foreground, background) >= 4.5
      assert f'color:{foreground};background:{background}' in (
        plots.exit_map_html(
          [dict(example, exit_layers=[layer] * 5)], layers, 'map'
        )
      )
  # The yellow of the top layer takes black text: 1.26:1 with white.
  assert plots.text_colour(plots.layer_colour(8, 8)) == '#000000'
  assert plots.contrast('#ffffff', plots.layer_colour(8, 8)) < 1.5
  _, png = plots.write_exit_map(
    [example], 8, 'map', str(tmp_path / 'a.html'), str(tmp_path / 'a.png')
  )
  # Title and legend, input and target lines, one token line, a gap.
  assert _png_size(png)[1] == pytest.approx(100 * (0.6 + 0.28 * 6), abs=1)


def test_quality_axes_show_at_least_ten_points():
  assert plots._quality_limits([99.9, 100.0]) == pytest.approx((89.2, 100.0))
  low, high = plots._quality_limits([20.0, 80.0])
  assert low < 20 and 80 < high <= 100
