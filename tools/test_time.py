"""How long `make test` takes on a fresh clone, as CI runs it.

Clones the committed HEAD into a temporary folder, then times `make install`
(a new .venv; pip's cache may make it faster than a first machine's),
`make test` with a cold XLA compilation cache (as in CI), and `make test`
again in the same clone (the cache in .venv now warm, as on a developer's
machine after the first run).

  python3 tools/test_time.py        # or: make test-time

Writes docs/test_time.json and docs/test_time.md; exits with the test run's
status. A wall time on a shared 2-core machine: compare runs made alike.
"""

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(command: list[str], cwd: str) -> tuple[int, float, str]:
  start = time.perf_counter()
  result = subprocess.run(
    command,
    cwd=cwd,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    check=False,
  )
  sys.stdout.write(result.stdout[-3000:])
  return result.returncode, time.perf_counter() - start, result.stdout


def _write(path: str, text: str) -> None:
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def main() -> int:
  commit = subprocess.run(
    ['git', 'rev-parse', 'HEAD'],
    cwd=ROOT,
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  with tempfile.TemporaryDirectory() as work:
    clone = os.path.join(work, 'clone')
    subprocess.run(['git', 'clone', '-q', ROOT, clone], check=True)
    install_rc, install_s, _ = _timed(['make', 'install'], clone)
    if install_rc:
      return install_rc
    test_rc, test_s, output = _timed(['make', 'test'], clone)
    warm_rc, warm_s, _ = _timed(['make', 'test'], clone)
  summary = re.findall(
    r'^=*\s*(\d+ (?:passed|failed).*?) in [\d.]+s', output, re.M
  )
  result = {
    'commit': commit,
    'date': datetime.date.today().isoformat(),
    'install_seconds': round(install_s),
    'test_seconds': round(test_s),
    'warm_test_seconds': round(warm_s),
    'pytest_summary': summary[-1] if summary else None,
    'exit_status': test_rc,
    'warm_exit_status': warm_rc,
  }
  _write(
    os.path.join(ROOT, 'docs', 'test_time.json'),
    json.dumps(result, indent=2) + '\n',
  )
  _write(
    os.path.join(ROOT, 'docs', 'test_time.md'),
    (
      '# `make test` on a fresh clone\n\n'
      f'Measured by `make test-time` on {result["date"]} at commit '
      f'`{commit[:10]}` (2-core CPU):\n\n'
      f'- `make install` (new .venv): {install_s / 60:.1f} min\n'
      f'- `make test` (cold compilation cache): {test_s / 60:.1f} min, '
      f'{result["pytest_summary"]}, exit status {test_rc}\n'
      f'- `make test` again (compilation cache warm): {warm_s / 60:.1f} min, '
      f'exit status {warm_rc}\n'
    ),
  )
  return test_rc or warm_rc


if __name__ == '__main__':
  sys.exit(main())
