"""config.runtime (ptm_jax.train.runtime): CPU device count and XLA flags, before JAX starts."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from ptm_jax.train import distributed, runtime

ROOT = os.path.join(os.path.dirname(__file__), '..')


def test_a_fresh_process_gets_the_devices_and_flags():
  script = ('import json, os, jax, ml_collections\n'
            'from ptm_jax.train import runtime\n'
            'applied = runtime.configure(ml_collections.ConfigDict(\n'
            "    {'cpu_devices': 3, 'xla_flags': '--xla_cpu_experimental_ynn_fusion_type='}))\n"
            "print(json.dumps([applied, len(jax.devices()), os.environ['XLA_FLAGS']]))\n")
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XLA_FLAGS'] = '--xla_cpu_enable_fast_math=false'   # the user's own flags are kept
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True).stdout
  applied, devices, flags = json.loads(out.strip().splitlines()[-1])
  assert applied and devices == 3
  assert flags == '--xla_cpu_enable_fast_math=false --xla_cpu_experimental_ynn_fusion_type='


def test_the_default_keeps_cpu_dots_off_ynnpack_in_a_fresh_process():
  # XLA marks a dot it hands to YNNPACK in the compiled HLO; the default flags must keep it on
  # XLA's own kernels, and XLA's defaults (runtime.xla_flags='') must still reach YNNPACK.
  script = ('import json, jax, jax.numpy as jnp, sys\n'
            'from ptm_jax.train import runtime\n'
            'settings = runtime.default_config()\n'
            'settings.xla_flags = sys.argv[1]\n'
            'assert runtime.configure(settings)\n'
            'a = jnp.ones((64, 64))\n'
            'hlo = jax.jit(lambda a: jnp.tanh(a @ a)).lower(a).compile().as_text()\n'
            "print(json.dumps('ynn' in hlo.lower()))\n")
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  used_ynnpack = {}
  for flags in (runtime.CPU_XLA_FLAGS, ''):
    out = subprocess.run([sys.executable, '-c', script, flags], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    used_ynnpack[flags] = json.loads(out.strip().splitlines()[-1])
  assert used_ynnpack == {runtime.CPU_XLA_FLAGS: False, '': True}


def test_the_compilation_cache_is_written_and_read_back(tmp_path):
  script = ('import json, sys, jax\n'
            'from ptm_jax.train import runtime\n'
            'settings = runtime.default_config()\n'
            'settings.compilation_cache_dir = sys.argv[1]\n'
            'assert runtime.configure(settings)\n'
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            'hits = []\n'
            'jax.monitoring.register_event_listener(\n'
            "    lambda event, **kw: hits.append(event) if 'cache_hits' in event else None)\n"
            'jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()\n'
            'print(json.dumps([jax.config.jax_compilation_cache_dir, len(hits)]))\n')
  cache = tmp_path / 'xla_cache'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  runs = []
  for _ in range(2):
    out = subprocess.run([sys.executable, '-c', script, str(cache)], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True).stdout
    runs.append(json.loads(out.strip().splitlines()[-1]))
  assert [path for path, _ in runs] == [str(cache)] * 2
  assert os.listdir(cache)
  assert runs[0][1] == 0 and runs[1][1] > 0, runs  # the second process compiled nothing


def test_a_running_jax_keeps_its_devices_and_says_so(caplog):
  before = os.environ.get('XLA_FLAGS')
  # The default flags are in this session's XLA_FLAGS already (conftest): nothing to do.
  assert runtime.configure(runtime.default_config())
  jax.devices()  # JAX runs (the test session's 8 devices)
  asked = ml_collections.ConfigDict({'cpu_devices': 2, 'xla_flags': '--xla_cpu_use_xnnpack=false'})
  with caplog.at_level('WARNING'):
    assert not runtime.configure(asked)
  assert 'runtime.cpu_devices=2' in caplog.text and 'fresh process' in caplog.text
  assert len(jax.devices()) == 8 and os.environ.get('XLA_FLAGS') == before


def test_a_running_jax_only_notes_the_default_flags_it_lacks(caplog, monkeypatch):
  # A notebook whose JAX started without the default flags: told at INFO level, not warned.
  jax.devices()
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  with caplog.at_level('INFO'):
    assert not runtime.configure(runtime.default_config())
  assert [r.levelname for r in caplog.records if 'cannot take effect' in r.getMessage()] == ['INFO']


def test_single_core_compilation_keeps_each_kernel_whole_and_gives_the_cores_back():
  # The test session has 8 CPU devices: at least as many as the cores, so the cores are held.
  assert jax.local_device_count() >= len(os.sched_getaffinity(0))
  threads = lambda: {int(t): os.sched_getaffinity(int(t)) for t in os.listdir('/proc/self/task')}
  before = threads()
  cores = os.sched_getaffinity(0)
  x = jax.numpy.ones((1024, 1024))
  # A distinct function each time: jit's caches must not hand back the other compilation.
  split = jax.jit(lambda x: jax.numpy.tanh(x) * 3).lower(x).compile().as_text()
  with runtime.single_core_compilation():
    whole = jax.jit(lambda x: jax.numpy.tanh(x) * 2).lower(x).compile().as_text()
    inside = threads()
  assert 'outer_dimension_partitions' not in whole
  # XLA splits such a kernel over the cores it may use; with one core there is nothing to split.
  assert ('outer_dimension_partitions' in split) == (len(cores) > 1)
  assert all(len(mask) == 1 for mask in inside.values())
  after = threads()
  assert all(after[t] == mask for t, mask in before.items() if t in after)
  assert all(after[t] == cores for t in set(after) - set(before))  # started meanwhile


def test_single_core_kernels_get_a_compilation_cache_of_their_own(tmp_path):
  settings = runtime.default_config()
  settings.compilation_cache_dir = str(tmp_path)
  assert runtime._cache_dir(settings) == str(tmp_path)
  settings.single_core_kernels = True
  assert runtime._cache_dir(settings) == str(tmp_path / 'single_core_kernels')


def test_process_flags_without_a_coordinator_are_refused():
  # Ignored, every process of a meant-to-be multi-process run trained alone as process 0, all
  # writing the same workdir.
  for num_processes, process_id in ((2, 1), (2, None), (None, 1)):
    with pytest.raises(ValueError, match='--coordinator_address .* or --distributed'):
      distributed.initialize('', num_processes, process_id)
  assert distributed.initialize() is False  # a single-process run
  assert distributed.initialize('', 1, 0) is False  # said explicitly
