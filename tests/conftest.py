"""Test set-up: 8 forced CPU devices (so sharding is real), the library's CPU kernels, and exact
float32 matmuls."""

import os

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

# The longest files first (their --durations totals, longest first). `--dist loadfile` gives each
# worker whole files in collection order (pyproject: --no-loadscope-reorder); a long file handed
# out last would leave the other worker idle to the end.
LONGEST_FILES = ('test_configs.py', 'test_adapters.py', 'test_sharding.py', 'test_adapt_rules.py',
                 'test_layer_stack.py', 'test_train_step.py', 'test_zoo.py', 'test_lora.py',
                 'test_transfer_study.py', 'test_multiprocess.py', 'test_fault_tolerance.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable in a file
