"""Test set-up: 8 forced CPU devices (so sharding is real), the library's CPU kernels, and exact
float32 matmuls."""

import os

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import jax  # noqa: E402

from ptm_jax.train import runtime  # noqa: E402

# Set before any JAX backend starts (XLA reads XLA_FLAGS then, not when jax is imported): 8 CPU
# devices, and the library's CPU kernel choice as the trainer and the benchmark apply it.
os.environ['XLA_FLAGS'] = ' '.join(filter(None, [
    os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8',
    runtime.CPU_XLA_FLAGS]))

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache per test process: many tests build the same small models and
  steps, and the trainer jits a fresh closure each run, so without it XLA compiles the same
  programs again (about a quarter of test_train_step.py's time). One directory per worker
  (getbasetemp is per xdist worker): JAX writes cache entries without a lock, so a second process
  could read one half-written. Subprocesses started by tests do not inherit it."""
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.getbasetemp() / 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)
  yield
  jax.config.update('jax_compilation_cache_dir', None)

# The longest files first (their --durations totals, longest first). `--dist loadfile` gives each
# worker whole files in collection order (pyproject: --no-loadscope-reorder); a long file handed
# out last would leave the other worker idle to the end.
LONGEST_FILES = ('test_configs.py', 'test_adapters.py', 'test_sharding.py', 'test_adapt_rules.py',
                 'test_layer_stack.py', 'test_train_step.py', 'test_zoo.py', 'test_lora.py',
                 'test_transfer_study.py', 'test_multiprocess.py', 'test_fault_tolerance.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable in a file


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
  """serve(repo): huggingface_hub.snapshot_download answers every hub id with the files of the
  local folder repo that its allow_patterns match (what the hub would send), copied into a
  snapshot folder; returns the list of the file names fetched so far."""
  import fnmatch
  import shutil

  import huggingface_hub

  def serve(repo):
    fetched = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
      del repo_id, kwargs
      out = tmp_path / 'snapshot'
      out.mkdir(exist_ok=True)
      for name in os.listdir(repo):
        if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
          shutil.copy(os.path.join(repo, name), out)
          fetched.append(name)
      return str(out)

    monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot_download)
    return fetched

  return serve
