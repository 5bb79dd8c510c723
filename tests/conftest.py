"""Test-wide guards: no network (TFDS would retry downloads for minutes)."""
import os
import socket

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# bfloat16 rounded at every op, as the bf16 tests compare two programs token
# for token (no effect on float32). Subprocesses inherit it.
if '--xla_allow_excess_precision' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_allow_excess_precision=false').strip()
# transformers must never look for files on the Hub.
os.environ.setdefault('HF_HUB_OFFLINE', '1')

_real_connect = socket.socket.connect


def _local_only_connect(self, address):
  host = address[0] if isinstance(address, tuple) else address
  if isinstance(host, str) and (host.startswith('127.') or host in (
      'localhost', '::1') or self.family == socket.AF_UNIX):
    return _real_connect(self, address)
  raise OSError(f'network disabled in tests (tried {address!r})')


@pytest.fixture(autouse=True, scope='session')
def no_network():
  socket.socket.connect = _local_only_connect
  yield
  socket.socket.connect = _real_connect
