"""report_doc.py: the findings and tables say what the numbers say."""

from calm_jax.analysis import report_markdown


def _row(
  measure,
  consistency,
  delta,
  layers,
  quality,
  threshold=0.5,
  histogram=(6, 3, 1, 0, 0, 0, 0, 0),
):
  return {
    'task': 't',
    'measure': measure,
    'consistency': consistency,
    'delta': delta,
    'threshold': threshold,
    'metric': 'bleu',
    'quality': quality,
    'full_quality': 100.0,
    'test_risk': 0.1,
    'avg_layers': layers,
    'flops_ratio': 2.5,
    'speedup': 2.0,
    'exit_layers_histogram': list(histogram),
  }


def _results(
  violation_rate=0.04, kv_agreement=0.6, state_layers=2.0, decay_layers=1.3
):
  settings = (
    ('textual', 0.1),
    ('textual', 0.25),
    ('risk', 0.02),
    ('risk', 0.05),
  )
  table = [
    _row(
      m,
      c,
      d,
      state_layers if m == 'state' else 1.5,
      80.0,
      threshold=0.6 if c == 'risk' else 0.5,
    )
    for m in report_markdown.MEASURE_NAMES
    for c, d in settings
  ]
  mode = lambda agreement: {
    'quality': 90.0,
    'agreement_with_full': agreement,
    'avg_layers': 1.4,
    'metric': 'bleu',
  }
  return {
    'tasks': ['t'],
    'table': table,
    'settings': {'epsilon': 0.05, 'test_examples': 200},
    'sweep': [_row('softmax', 'textual', 0.05, 1.9, 95.0, threshold=0.8)],
    'validity': [
      {
        'consistency': 'textual',
        'delta': 0.1,
        'splits': 50,
        'violation_rate': violation_rate,
        'mean_test_risk': 0.05,
        'mean_avg_layers': 1.2,
        'certified_fraction': 1.0,
      }
    ],
    'decay': [
      {
        'task': 't',
        'mean_output_tokens': 12.0,
        'constant': _row('softmax', 'textual', 0.25, 1.5, 80.0),
        'decaying_tau4': _row(
          'softmax',
          'textual',
          0.25,
          decay_layers,
          78.0 if decay_layers != 1.5 else 80.0,
        ),
      }
    ],
    'analyses': {
      'oracle': {
        't': {
          'avg_layers': 1.25,
          'quality': 100.0,
          'metric': 'bleu',
          'mean_output_tokens': 12.0,
          'exit_layers_histogram': [8, 1, 1, 0, 0, 0, 0, 0],
        }
      },
      'ablation': {
        't': {
          'oracle_exits': {
            'hidden': mode(0.99),
            'kv_copy': mode(kv_agreement),
            'none': mode(0.7),
          }
        }
      },
      'curves': [
        {
          'task': 't',
          'kind': 'static',
          'metric': 'bleu',
          'points': [(1.0, 40.0), (2.0, 90.0), (3.0, 100.0)],
        }
      ],
    },
  }


def test_findings_follow_the_numbers():
  text = report_markdown.findings(_results())
  # 80 at 1.5 layers against the static curve interpolated at 1.5: 65.
  assert (
    'quality 80.0 against 65.0' in text
    and '-> held: early exit beat them' in text
  )
  # 0.05 + 2 * sqrt(0.05 * 0.95 / 50) = 0.112
  assert 'allows up to 0.11): worst violation rate 0.04 -> held' in text
  assert '-> held: the K/V copy degrades the output' in text
  assert (
    'softmax vs state: risk δ=0.02: 1.50 vs 2.00, risk δ=0.05: 1.50 vs '
    '2.00, textual δ=0.1: 1.50 vs 2.00, textual δ=0.25: 1.50 vs 2.00) '
    '-> held.'
  ) in text
  assert 'The oracle needs 1.25-1.25 layers' in text
  assert (
    '(12.0 output tokens): 1.30 layers, quality 78.0, x2.00 vs 1.50, '
    '80.0, x2.00 with a constant threshold (the longest task) -> held: '
    'it changes layers or quality.'
  ) in text
  table = report_markdown.decay_table(_results())
  assert (
    '| t (12.0) | decaying tau4 | 0.50 | 1.30 | 78.0 | 0.100 | '
    'x2.00 (2.00-2.00) |'
  ) in table
  text = report_markdown.findings(
    _results(violation_rate=0.2, kv_agreement=0.99)
  )
  assert 'worst violation rate 0.20 -> not held' in text
  assert '-> not held: the K/V copy does not degrade it here' in text
  text = report_markdown.findings(_results(state_layers=1.2, decay_layers=1.5))
  assert '1.50 vs 1.20) -> not held.' in text
  # Both at full depth (nothing certified): no comparison in that setting.
  results = _results()
  for row in results['table']:
    if row['consistency'] == 'risk' and row['measure'] in ('softmax', 'state'):
      row['avg_layers'] = 8.0
  tied = report_markdown.findings(results)
  assert '-> held (equal layers in 2 settings).' in tied
  assert '(the longest task) -> not held: no change in layers' in text


def test_difficulty_table_shows_exit_shares_and_both_thresholds():
  text = report_markdown.difficulty(_results())
  assert (
    '| t | 12.0 | 100.0 | 1.25 | 80 · 10 · 10 · 0 · 0 · 0 · 0 · 0 | '
    '1.50 | 60 · 30 · 10 · 0 · 0 · 0 · 0 · 0 | 0.80 / 0.60 |'
  ) in text


def test_figures_link_relative_to_the_document(tmp_path):
  docs = str(tmp_path / 'docs')
  links = report_markdown._figures(
    {
      'figures': {
        'layers_speedup': 'figures/a.png',
        'risk': 'figures/b.png',
        'quality': f'{docs}/figures/c.png',
        'histogram': 'figures/d.png',
      },
      'exit_maps': {'t': ['figures/m.html', 'figures/m.png']},
    },
    docs,
  )
  assert '](figures/a.png)' in links and '](figures/c.png)' in links
  assert 'interactive: figures/m.html' in links and '../' not in links


def test_table2_has_a_cell_per_measure_and_setting():
  text = report_markdown.table2(_results())
  assert text.count('1.50 · x2.50 · x2.00') == 2 * 4  # softmax, classifier
  assert text.count('2.00 · x2.50 · x2.00') == 4  # state
  assert '| t | classifier | 80.0 (0.100); λ 0.50 |' in text
  assert 'textual δ=0.1 | textual δ=0.25 | risk δ=0.02 | risk δ=0.05' in text
  assert 'one standard error at risk 0.25: 0.031' in text
