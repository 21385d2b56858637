"""Process-level JAX settings from config.runtime, applied before JAX starts its backends.

Some settings exist only per process and only before the first JAX operation: the number of CPU
devices (`jax_num_cpu_devices`) and XLA's compiler flags (XLA_FLAGS). A config file can ask for
them (configs/gpt_shakespeare_char.py runs data-parallel over 2 CPU devices), and
`experiments.train` applies them first thing. Where JAX is already running (a notebook, a test
session, a second run in one process) they are left as they are, with a warning that names them.
"""

import os

from absl import logging
import jax
import ml_collections


def default_config() -> ml_collections.ConfigDict:
  # cpu_devices: how many devices the CPU backend shows (0 = JAX's default, one), so that a
  # many-core host can run data-parallel programs side by side. xla_flags: appended to XLA_FLAGS.
  return ml_collections.ConfigDict({'cpu_devices': 0, 'xla_flags': ''})


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def configure(runtime: ml_collections.ConfigDict) -> bool:
  """Applies config.runtime if JAX has not started; returns whether it did (or had nothing to do)."""
  wanted = []
  if runtime.cpu_devices:
    wanted.append(f'runtime.cpu_devices={runtime.cpu_devices}')
  if runtime.xla_flags:
    wanted.append(f'runtime.xla_flags={runtime.xla_flags!r}')
  if not wanted:
    return True
  if _backends_started():
    logging.warning('JAX is already running, so %s cannot take effect in this process; the run '
                    'goes on with the current devices and flags. Start a fresh process (python -m '
                    'experiments.train) to apply them.', ' and '.join(wanted))
    return False
  if runtime.cpu_devices:
    jax.config.update('jax_num_cpu_devices', int(runtime.cpu_devices))
  if runtime.xla_flags:
    os.environ['XLA_FLAGS'] = ' '.join(filter(None, [os.environ.get('XLA_FLAGS', ''),
                                                     runtime.xla_flags]))
  return True
