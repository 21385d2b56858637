"""Test set-up: 8 forced CPU devices (so sharding is real) and exact float32 matmuls."""

import os

# Must happen before jax is imported anywhere.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
