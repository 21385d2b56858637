"""Process-level JAX settings from config.runtime, applied before JAX starts its backends.

Some settings exist only per process and only before the first JAX operation: the number of CPU
devices (`jax_num_cpu_devices`), XLA's compiler flags (XLA_FLAGS) and the persistent compilation
cache's directory (`jax_compilation_cache_dir`). A config file can ask for
them (configs/gpt_shakespeare_char.py runs data-parallel over 2 CPU devices), and
`experiments.train` applies them first thing. Where JAX is already running (a notebook, a test
session, a second run in one process) they are left as they are, with a warning that names them
(an info line when only the default CPU kernel flags, CPU_XLA_FLAGS, are missing).
"""

import contextlib
import os

from absl import logging
import jax
import ml_collections


# The default XLA flags: XLA's own (Eigen) dot and convolution kernels on CPU instead of
# YNNPACK's, which XLA's CPU backend uses by default since jax 0.10. On the x86 hosts measured
# (README: Benchmarks, shakespeare_char) Eigen's were faster or within the run-to-run spread:
# ResNet-50 inference about 3x, ViT-B/16 training 1.2x, GPT-2 training 1.1x, the shakespeare_char
# step's dots 19 vs 39 ms of thread time. CPU-only: other backends ignore it.
# `--config.runtime.xla_flags=` turns YNNPACK back on.
CPU_XLA_FLAGS = '--xla_cpu_experimental_ynn_fusion_type='


def default_config() -> ml_collections.ConfigDict:
  # cpu_devices: how many devices the CPU backend shows (0 = JAX's default, one), so that a
  # many-core host can run data-parallel programs side by side. xla_flags: appended to XLA_FLAGS.
  # compilation_cache_dir: JAX's persistent compilation cache ('' = off): a later run of the
  # same shapes and config loads its compiled steps from there instead of compiling them (the
  # shakespeare_char recipe starts about 4 s sooner). Off by default: the cache grows without
  # bound, and its place is the user's choice (e.g. ~/.cache/ptm_jax/xla).
  # single_core_kernels: compile the train step's kernels whole, not split over the cores
  # (single_core_compilation), where the CPU devices are at least as many as the cores.
  return ml_collections.ConfigDict({'cpu_devices': 0, 'xla_flags': CPU_XLA_FLAGS,
                                    'compilation_cache_dir': '', 'single_core_kernels': False})


def _cache_dir(runtime: ml_collections.ConfigDict) -> str | None:
  path = runtime.get('compilation_cache_dir', '')
  if not path:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  # JAX's cache key does not see the threads' affinity at compile time, so programs compiled
  # under single_core_compilation get a cache of their own.
  return os.path.join(path, 'single_core_kernels') if runtime.get('single_core_kernels') else path


def _missing_flags(xla_flags: str) -> list[str]:
  """The flags of xla_flags that XLA_FLAGS does not hold already (a test session sets them)."""
  present = set(os.environ.get('XLA_FLAGS', '').split())
  return [f for f in xla_flags.split() if f not in present]


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def configure(runtime: ml_collections.ConfigDict) -> bool:
  """Applies config.runtime if JAX has not started; returns whether it did (or had nothing to do).

  Returns False where JAX already runs and the settings differ from its own.
  """
  wanted = []
  missing = _missing_flags(runtime.xla_flags)
  if runtime.cpu_devices:
    wanted.append(f'runtime.cpu_devices={runtime.cpu_devices}')
  if missing:
    wanted.append(f'runtime.xla_flags={" ".join(missing)!r}')
  cache_dir = _cache_dir(runtime)
  if cache_dir and jax.config.jax_compilation_cache_dir != cache_dir:
    wanted.append(f'runtime.compilation_cache_dir={cache_dir!r}')
  if not wanted:
    return True
  if _backends_started():
    # The default kernel flags are a speed preference, not a request: a notebook that runs JAX
    # already is told so quietly, not warned on every run.
    only_default = not runtime.cpu_devices and runtime.xla_flags == CPU_XLA_FLAGS
    (logging.info if only_default else logging.warning)(
        'JAX is already running, so %s cannot take effect in this process; the run goes on '
        'with the current devices and flags. Start a fresh process (python -m '
        'experiments.train) to apply them.', ' and '.join(wanted))
    return False
  if runtime.cpu_devices:
    jax.config.update('jax_num_cpu_devices', int(runtime.cpu_devices))
  if missing:
    os.environ['XLA_FLAGS'] = ' '.join(filter(None, [os.environ.get('XLA_FLAGS', ''), *missing]))
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
  return True


def _thread_ids() -> list[int]:
  return [int(t) for t in os.listdir('/proc/self/task')]


@contextlib.contextmanager
def single_core_compilation(enabled: bool = True):
  """CPU programs compiled inside run each kernel on one thread, not split over the cores.

  XLA's CPU compiler splits large elementwise kernels into as many parallel tasks as the
  compiling thread may use cores (sched_getaffinity); it has no option for this. Where the CPU
  devices are at least as many as the cores (runtime.cpu_devices, data-parallel), each device
  already keeps a core busy, and a split kernel waits for a task queued behind another device's
  work: the shakespeare_char step takes about 34 ms split and 32 ms unsplit on 2 cores (README).
  So every thread of the process is held to one core while the program compiles (XLA compiles
  on threads of its own, so holding the calling thread alone changes nothing), and all get
  their cores back after; the compiled program still runs on all of them. XLA's code
  generation is held to that core too, which makes the compile slower (about 1 s on that
  step). A no-op off the CPU backend, where there are more cores than devices (split kernels
  find idle cores), on one core, or where the OS has no thread affinity.
  """
  if (not enabled or jax.default_backend() != 'cpu' or not hasattr(os, 'sched_setaffinity')
      or not os.path.isdir('/proc/self/task')):
    yield
    return
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < 2 or jax.local_device_count() < len(cores):
    yield
    return
  one = {cores[jax.process_index() % len(cores)]}  # processes on one host compile side by side
  saved = {}
  try:
    for tid in _thread_ids():
      try:
        saved[tid] = os.sched_getaffinity(tid)
        os.sched_setaffinity(tid, one)
      except OSError:  # the thread ended meanwhile
        pass
    yield
  finally:
    # Threads started meanwhile inherited the one core; a thread may start another while this
    # loop runs, so it goes round until no thread is left unrestored.
    restored = set()
    for _ in range(100):
      pending = [tid for tid in _thread_ids() if tid not in restored]
      if not pending:
        break
      for tid in pending:
        try:
          os.sched_setaffinity(tid, saved.get(tid, set(cores)))
        except OSError:
          pass
        restored.add(tid)
