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
  rows = [{'task': task, 'measure': measure, 'delta': delta,
           'avg_layers': 8 - 20 * delta - i, 'speedup': 1 + 4 * delta + i}
          for task in ('a', 'b') for i, measure in enumerate(('softmax',
                                                               'state'))
          for delta in (0.1, 0.2, 0.3)]
  path = tmp_path / 'layers.png'
  plots.layers_and_speedup_vs_delta(rows, str(path))
  _check_png(path, (1000, 600))  # 2 tasks x (layers, speed-up) panels


def test_risk_vs_delta(tmp_path):
  rows = [{'consistency': c, 'delta': d, 'mean_test_risk': 0.7 * d,
           'violation_rate': 0.02, 'epsilon': 0.05}
          for c in ('textual', 'risk') for d in (0.05, 0.1, 0.2)]
  path = tmp_path / 'risk.png'
  plots.risk_vs_delta(rows, str(path))
  _check_png(path, (1000, 400))


def test_quality_vs_layers(tmp_path):
  curves = [{'task': t, 'kind': 'static', 'metric': 'bleu',
             'points': [(k, 10 * k) for k in range(1, 9)]} for t in 'xyz']
  curves += [{'task': t, 'kind': 'softmax', 'metric': 'bleu',
              'points': [(1.5, 60), (2.5, 80), (4.0, 80)]} for t in 'xyz']
  path = tmp_path / 'quality.png'
  plots.quality_vs_layers(curves, str(path))
  _check_png(path, (1500, 400))


def test_exit_histogram(tmp_path):
  path = tmp_path / 'hist.png'
  plots.exit_histogram({'a': [1, 1, 2, 8], 'b': [3, 3, 3]}, 8, str(path))
  _check_png(path, (800, 300))


EXAMPLES = [
    {'inputs': 'translate English to French: the red <car> .',
     'tokens': ['\u2581la', '\u2581voiture', '\u2581rouge', '\u2581.', '</s>'],
     'exit_layers': [1, 3, 8, 1, 1],
     'confidences': [0.97, 0.91, 0.42, 0.99, 1.0]},
    {'inputs': 'question: who ?', 'tokens': ['\u2581<b>', '</s>'],
     'exit_layers': [2, 1], 'confidences': [0.8, 0.95]},
]


def test_exit_map_html_has_one_element_per_token_with_its_layer():
  page = plots.exit_map_html(EXAMPLES, 8, 'exit map')
  tokens = re.findall(r'<span class="tok" data-layer="(\d+)" '
                      r'data-confidence="([\d.]+)"[^>]*>([^<]*)</span>', page)
  assert [(int(l), float(c)) for l, c, _ in tokens] == [
      (l, c) for ex in EXAMPLES
      for l, c in zip(ex['exit_layers'], ex['confidences'])]
  assert [t for _, _, t in tokens][:3] == [' la', ' voiture', ' rouge']
  assert '&lt;b&gt;' in page and '&lt;car&gt;' in page  # text is escaped
  assert 'title="layer 8, confidence 0.42"' in page
  assert plots.layer_colour(1, 8) != plots.layer_colour(8, 8)
  assert f'background:{plots.layer_colour(3, 8)}" title="layer 3' in page


def test_write_exit_map_writes_html_and_png(tmp_path):
  html_path, png_path = plots.write_exit_map(
      EXAMPLES, 8, 'exit map', str(tmp_path / 'm.html'),
      str(tmp_path / 'm.png'))
  assert open(html_path).read().count('data-layer=') == 7
  width, height = _png_size(png_path)
  assert width == 1000 and height == pytest.approx(
      100 * (0.6 + 0.28 * (2 + 2)), abs=1)
