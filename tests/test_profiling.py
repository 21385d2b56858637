"""ptm_jax.train.profiling: op time per device and module from a jax.profiler trace, counted once."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_summary
from ptm_jax.train import profiling


def _write_trace(path, events):
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}}]
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    json.dump({'traceEvents': meta + events}, f)


def _op(name, ts, dur, run, tid=1, device=0, module='jit_step'):
  return {'ph': 'X', 'pid': 1, 'tid': tid, 'name': name, 'ts': ts, 'dur': dur,
          'args': {'hlo_op': name, 'hlo_module': module, 'device_ordinal': str(device),
                   'run_id': str(run)}}


HLO = '''HloModule jit_step, is_scheduled=true
  %dot.1 = f32[4,4]{1,0} dot(%a, %b), metadata={op_name="jit(step)/jvp(M)/layer_0/mlp/dot_general"}
  %dot.2 = f32[4,4]{1,0} dot(%a, %b), metadata={op_name="jit(step)/jvp(M)/layer_1/mlp/dot_general"}
  %add_multiply_fusion = f32[4] fusion(%x), kind=kLoop, metadata={op_name="jit(step)/transpose(jvp(M))/layer_0/mul"}
  %all-reduce.3 = f32[4] all-reduce(%g), metadata={op_name="jit(step)/add"}
'''


def test_self_time_waits_runs_and_sources(tmp_path):
  trace = tmp_path / 'vm.trace.json.gz'
  events = []
  for run, t0 in ((7, 0.0), (8, 1000.0)):
    events += [
        # A conditional holding two dots: its own time is 10 us, not 110.
        _op('conditional', t0, 110, run),
        _op('dot.1', t0 + 5, 40, run),
        _op('dot.2', t0 + 50, 60, run),
        _op('add_multiply_fusion', t0 + 120, 30, run),
        # The all-reduce's rendezvous wait (no hlo_op) stays in the collective's time.
        _op('all-reduce.3', t0 + 160, 40, run),
        {'ph': 'X', 'pid': 1, 'tid': 1, 'name': 'Rendezvous', 'ts': t0 + 165, 'dur': 30,
         'args': {}},
        # Another device's op, on another thread, is another group.
        _op('dot.1', t0, 500, run, tid=2, device=1),
        # Another module's instruction of the same name takes nothing from jit_step's text.
        _op('add_multiply_fusion', t0 + 300, 5, run, module='jit_eval'),
    ]
  _write_trace(trace, events)
  summary = profiling.summarize(str(trace), HLO)
  device0_eval, device0, device1 = summary['modules']  # sorted by device, then module
  assert device0_eval['module'] == 'jit_eval' and device0_eval['by_phase'] == {
      'unknown': pytest.approx(5e-6)}
  assert (device0['device'], device0['module']) == ('/host:CPU device 0', 'jit_step')
  assert device0['executions'] == 2
  assert device0['op_seconds_per_step'] == pytest.approx((10 + 40 + 60 + 30 + 40) * 1e-6)
  assert device0['span_seconds_per_step'] == pytest.approx(200e-6)
  assert device0['by_category'] == pytest.approx(
      {'dot': 100e-6, 'elementwise or reduce fusion': 30e-6, 'collective': 40e-6, 'other': 10e-6})
  assert device0['by_phase'] == pytest.approx(
      {'forward': 100e-6, 'backward': 30e-6, 'other': 40e-6, 'unknown': 10e-6})
  # The two layers' dots are one source, layer indices folded.
  top = {(o['op'], o['source']): o for o in device0['top_ops']}
  dots = top[('dot', 'jit(step)/jvp(M)/layer_N/mlp/dot_general')]
  assert dots['seconds_per_step'] == pytest.approx(100e-6)
  assert dots['calls_per_step'] == 2
  assert device1['device'] == '/host:CPU device 1'
  assert device1['op_seconds_per_step'] == pytest.approx(500e-6)
  text = profiling.format_summary(summary)
  assert 'jit_step (2 executions): 0.18 ms of ops per execution over a span of 0.20 ms' in text


@pytest.mark.parametrize('name, expected', [
    ('dot.12', 'dot'), ('custom-call.3', 'other'), ('convert_convert_fusion', 'elementwise or reduce fusion'),
    ('convolution.4', 'convolution'), ('cudnn-conv-bias-activation', 'convolution'),
    ('all-reduce.41', 'collective'), ('reduce-scatter', 'collective'),
    ('transpose_copy_fusion.2', 'copy/transpose'), ('multiply_erf_fusion', 'elementwise or reduce fusion'),
    ('copy.384', 'copy/transpose'), ('cudnn_generated_fort_native_sdpa_sm90', 'fused attention'),
    ('sm90_xmma_gemm_bf16bf16', 'dot'), ('loop_add_fusion', 'elementwise or reduce fusion'),
])
def test_categories(name, expected):
  assert profiling.category(name) == expected


def test_a_gpu_shaped_trace(tmp_path):
  """Kernels on a /device: process, tagged without run_id or device ordinal; the host's
  launches carry the same tags and are not device time; a custom call goes by its target."""
  trace = tmp_path / 'gpu.trace.json.gz'
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'name': 'process_name', 'pid': 3, 'args': {'name': '/host:CUPTI'}}]
  kernel = lambda name, op, ts, dur: {
      'ph': 'X', 'pid': 2, 'tid': 7, 'name': name, 'ts': ts, 'dur': dur,
      'args': {'hlo_op': op, 'hlo_module': 'jit_train_step'} if op else {}}
  events = []
  for t0 in (0.0, 1000.0):
    events += [kernel('cudnn_generated_fort_native_sdpa', 'custom-call.7', t0, 300),
               kernel('sm90_xmma_gemm', 'dot.3', t0 + 300, 200),
               kernel('memcpy_kernel', None, t0 + 600, 50),
               {'ph': 'X', 'pid': 3, 'tid': 1, 'name': 'cuLaunchKernel', 'ts': t0, 'dur': 20,
                'args': {'hlo_op': 'dot.3', 'hlo_module': 'jit_train_step'}}]
  with gzip.open(trace, 'wt', encoding='utf-8') as f:
    json.dump({'traceEvents': meta + events}, f)
  hlo = ('HloModule jit_train_step\n'
         '  %custom-call.7 = (bf16[2,8]) custom-call(%q), custom_call_target="__cudnn$fmhaSoftmax"\n')
  step, untagged = profiling.summarize(str(trace), hlo, steps=2)['modules']
  assert (step['device'], step['module'], step['executions']) == (
      '/device:GPU:0', 'jit_train_step', 2)
  assert not step['executions_counted']
  assert step['by_category'] == pytest.approx({'dot': 200e-6, 'fused attention': 300e-6})
  assert step['span_seconds_per_step'] == pytest.approx(1500e-6 / 2)
  assert untagged['module'] == 'untagged' and untagged['op_seconds_per_step'] == pytest.approx(50e-6)
  text = profiling.format_summary({'trace': str(trace), 'modules': [step]})
  assert '(2 executions, as given: the trace does not number them)' in text


def test_a_trace_without_ops_says_so(tmp_path):
  trace = tmp_path / 'empty.trace.json.gz'
  _write_trace(trace, [{'ph': 'X', 'pid': 1, 'tid': 1, 'name': 'Python', 'ts': 0, 'dur': 5}])
  summary = profiling.summarize(str(trace))
  assert summary['modules'] == []
  assert 'No XLA op events in the trace' in profiling.format_summary(summary)


def test_a_real_cpu_trace_of_a_gradient_step(tmp_path, capsys):
  w = jnp.ones((64, 64))

  def loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)

  step = jax.jit(jax.grad(loss))
  x = jnp.ones((32, 64))
  compiled = step.lower(w, x).compile()
  jax.block_until_ready(compiled(w, x))
  profiling.write_hlo(compiled, str(tmp_path), 'step')
  with jax.profiler.trace(str(tmp_path), profiler_options=profiling.profiler_options()):
    for _ in range(3):
      jax.block_until_ready(compiled(w, x))
  summary = profiling.summarize(profiling.find_trace(str(tmp_path)),
                                (tmp_path / 'step.hlo.txt').read_text())
  [module] = [m for m in summary['modules'] if m['device'].endswith('device 0')
              and m['module'] == 'jit_loss']
  assert module['executions'] == 3
  assert module['by_category']['dot'] > 0
  assert sum(module['by_category'].values()) == pytest.approx(module['op_seconds_per_step'])
  assert {'forward', 'backward'} <= set(module['by_phase'])
  assert any('dot_general' in o['source'] for o in module['top_ops'])
  # The command line finds the trace and the one *.hlo.txt in the directory.
  profile_summary.run(str(tmp_path), json_out=str(tmp_path / 's.json'))
  assert 'by category: dot' in capsys.readouterr().out
  assert json.loads((tmp_path / 's.json').read_text())['modules']


def test_a_directory_without_a_trace_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='No \\*.trace.json.gz under .*--profile_dir'):
    profiling.find_trace(str(tmp_path))
