"""timing.py: callables take turns on every input, one time per pass."""

from calm_jax.evaluation import timing


def test_alternating_seconds_interleaves_callables_per_input():
  calls = []
  runs = {
    'a': lambda x: calls.append(('a', x)),
    'b': lambda x: calls.append(('b', x)),
  }
  times = timing.alternating_seconds(runs, [1, 2], repeats=3)
  assert calls == [('a', 1), ('b', 1), ('a', 2), ('b', 2)] * 3
  assert set(times) == {'a', 'b'}
  assert all(len(t) == 3 and all(s >= 0 for s in t) for t in times.values())
