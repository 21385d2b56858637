"""experiments/benchmark.py in its tiny form: the CLI, the JSON schema, and the two sides doing the
same work (the transformers peer, built from our weights, gives our first losses and logits)."""

import glob
import json
import math

from absl.testing import flagsaver
import pytest

from experiments import benchmark

TOP_KEYS = {'model', 'size', 'mode', 'shape', 'device', 'ours', 'peer', 'ratio'}
SIDE_KEYS = {'throughput', 'unit', 'compile_s', 'peak_memory_bytes'}


def run_main(tmp_path, *args) -> dict:
  """benchmark.main with these flags, as `python -m experiments.benchmark ARGS` runs it."""
  out = tmp_path / 'result.json'
  argv = ['benchmark', *args, f'--json_out={out}']
  with flagsaver.flagsaver():
    benchmark.FLAGS(argv)
    benchmark.main(argv[:1])
  return json.loads(out.read_text())


@pytest.mark.parametrize('model, mode, shape', [
    ('gpt2', 'train', '--seq_len=16'),
    ('gpt2', 'infer', '--seq_len=16'),
    ('vit', 'train', '--image_size=32'),
    ('vit', 'infer', '--image_size=32'),
    ('resnet', 'train', '--image_size=32'),  # BatchNorm statistics updated on both sides
])
def test_tiny_benchmark_against_torch(tmp_path, model, mode, shape):
  # gpt2 infer also writes a profile of ours.
  profile = [f'--profile_dir={tmp_path / "profile"}'] if (model, mode) == ('gpt2', 'infer') else []
  record = run_main(tmp_path, f'--model={model}', '--size=tiny', f'--mode={mode}', shape,
                    '--batch_size=2', '--peer=torch', '--steps=2', '--warmup=2', *profile)
  if profile:
    assert glob.glob(str(tmp_path / 'profile' / '**' / '*.xplane.pb'), recursive=True)
    # Where the traced steps' time went, per device (ptm_jax.train.profiling).
    assert 'error' not in record['profile']
    [step_profile] = [m for m in record['profile']['modules'] if m['device'].endswith('device 0')]
    assert step_profile['executions'] == benchmark.PROFILED_STEPS
    assert step_profile['op_seconds_per_step'] > 0 and step_profile['by_category']['dot'] > 0
  # The XLA flags the run had, for reproduction: here the test session's forced device count.
  assert '--xla_force_host_platform_device_count=8' in record['xla_flags']
  assert TOP_KEYS <= set(record)
  assert (record['model'], record['size'], record['mode']) == (model, 'tiny', mode)
  assert record['shape']['batch_size'] == 2
  for side in ('ours', 'peer'):
    assert SIDE_KEYS <= set(record[side]), side
    assert record[side]['throughput'] > 0
    assert len(record[side]['times_s']) == 2
    # Each timed step's page faults (the warm-up runs until the heap has settled).
    faults = record[side]['minor_faults']
    assert len(faults) == 2 and all(isinstance(f, int) and f >= 0 for f in faults)
  assert 2 <= record['warmup_steps'] <= benchmark.MAX_WARMUP
  assert record['ours']['compile_s'] > 0
  assert record['ours']['peak_memory_bytes'] > 0
  # On the CPU the peer's memory is not measured, and the JSON says why.
  assert record['peer']['peak_memory_bytes'] is None and record['peer']['peak_memory_note']
  assert record['ratio'] == pytest.approx(
      record['ours']['throughput'] / record['peer']['throughput'])
  assert record['ours']['unit'] == record['peer']['unit']
  assert record['model_flops_per_step'] > 0
  assert record['command'].startswith(f'python -m experiments.benchmark --model={model}')
  if mode == 'train':
    # Same weights, batch and task: the same loss before and after one AdamW update.
    check = record['loss_check']
    assert check['ours'] == pytest.approx(check['peer'], rel=1e-4)
    assert not math.isclose(check['ours'][0], check['ours'][1])  # the update changed the weights
  else:
    assert record['logits_check']['max_abs_diff'] <= 1e-4


def test_warmup_goes_on_while_the_steps_page_fault(tmp_path, monkeypatch):
  # Every step of the first three rounds faults (a growing heap); the rounds after none: the
  # warm-up takes the three, then one settled round, beyond the --warmup=2 asked for.
  calls = {'n': 0}

  def faults():  # 4 reads a round (before and after each side's step)
    calls['n'] += 1
    return 10**6 * min(calls['n'], 12)

  monkeypatch.setattr(benchmark, '_minor_faults', faults)
  record = run_main(tmp_path, '--model=gpt2', '--size=tiny', '--mode=infer', '--seq_len=8',
                    '--batch_size=1', '--peer=torch', '--steps=1', '--warmup=2')
  assert record['warmup_steps'] == 4


@pytest.mark.parametrize('model, shape', [('bert', '--seq_len=16'), ('clip', '--seq_len=16')])
def test_tiny_dry_run(tmp_path, model, shape):
  record = run_main(tmp_path, f'--model={model}', '--size=tiny', '--mode=train', shape,
                    '--batch_size=2', '--image_size=32', '--dry_run')
  assert record['dry_run'] and record['peer'] is None and record['ratio'] is None
  assert record['ours']['throughput'] is None
  assert record['ours']['compile_s'] > 0 and record['ours']['peak_memory_bytes'] > 0


def test_gpt2_analytic_flops_match_xla():
  """6N + 12LHQT against XLA's count of the same step (both count attention in full)."""
  import jax
  import flax.linen as nn
  cfg = benchmark.model_config('gpt2', 'tiny', 16, None)
  module = benchmark.build_module('gpt2', cfg, jax.numpy.float32, None)
  batch = benchmark.make_batch('gpt2', cfg, 2, 16, None, 0)
  params = nn.unbox(module.init(jax.random.key(0), input_ids=batch['input_ids']))['params']
  analytic = benchmark.gpt2_analytic_flops(cfg, params, 2, 16, 'infer')
  xla = benchmark.hardware.flops_of(jax.jit(benchmark.make_infer_fn(module, 'gpt2')).lower(
      {'params': params}, batch))
  # XLA also counts LayerNorms, GELUs, softmax and the loss-free bias adds: a few % more.
  assert analytic <= xla <= 1.15 * analytic


def test_unknown_size_is_refused():
  with pytest.raises(ValueError, match='Unknown --size'):
    benchmark.model_config('vit', 'b17', None, 224)


def test_the_command_line_runs_under_the_retaining_malloc(tmp_path):
  """`python -m experiments.benchmark` re-executes itself with RETAIN_MALLOC (both sides'
  allocator); --malloc=default keeps glibc's, and a user's own GLIBC_TUNABLES are not overridden."""
  import os
  import subprocess
  import sys
  root = os.path.join(os.path.dirname(__file__), '..')
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}

  def cli(*flags, extra_env=None):
    out = tmp_path / 'cli.json'
    subprocess.run([sys.executable, '-m', 'experiments.benchmark', '--model=gpt2', '--size=tiny',
                    '--seq_len=16', '--batch_size=2', '--dry_run', f'--json_out={out}', *flags],
                   cwd=root, env={**env, **(extra_env or {})}, check=True, capture_output=True)
    return json.loads(out.read_text())

  record = cli()
  assert record['malloc'] == {'setting': 'retain', 'glibc_tunables': benchmark.RETAIN_MALLOC}
  assert '--malloc' not in record['command']
  record = cli('--malloc=default')
  assert record['malloc'] == {'setting': 'default', 'glibc_tunables': None}
  assert record['command'].endswith('--malloc=default')
  with pytest.raises(subprocess.CalledProcessError) as failure:
    cli(extra_env={'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert 'GLIBC_TUNABLES is set' in failure.value.stderr.decode()


def test_model_flops_do_not_depend_on_scan_layers():
  """--scan_layers is the same maths: XLA's cost analysis counts a scanned stack's body once, so
  the model FLOPs (and MFU) come from the looped module."""
  flops = {}
  for mode in ('train', 'infer'):
    for scan in (False, True):
      record = benchmark.run(benchmark.Options(model='gpt2', size='tiny', mode=mode,
                                               batch_size=2, seq_len=16, scan_layers=scan,
                                               dry_run=True))
      flops[(mode, scan)] = record['model_flops_per_step']
    assert flops[(mode, True)] == pytest.approx(flops[(mode, False)], rel=1e-3), mode


@pytest.mark.parametrize('mode', ['train', 'infer'])
def test_gpt2_peer_builds_no_key_value_cache(mode):
  """Ours keeps no key/value cache; transformers' GPT-2 fills one (config.use_cache) unless told
  not to, copying every layer's keys and values."""
  import jax
  import flax.linen as nn
  import transformers
  cfg = benchmark.model_config('gpt2', 'tiny', 16, None)
  module = benchmark.build_module('gpt2', cfg, jax.numpy.float32, 'xla')
  batch = benchmark.make_batch('gpt2', cfg, 2, 16, None, 0)
  variables = jax.device_get(nn.unbox(module.init(jax.random.key(0),
                                                  input_ids=batch['input_ids'])))
  model, _ = benchmark.build_peer(module, variables, 'cpu')
  outputs = []
  model.register_forward_hook(lambda _, args, out: outputs.append(out))
  peer = benchmark.TorchPeer(model, 'gpt2', mode, benchmark.torch_batch('gpt2', batch, 'cpu'),
                             'float32', 'cpu')
  peer()
  [out] = outputs
  assert out.logits.shape == (2, 16, cfg.vocab_size)
  assert not [k for k, v in out.items() if isinstance(v, transformers.Cache)]


@pytest.mark.parametrize('flag', ['--batch_size=0', '--seq_len=0', '--image_size=0',
                                  '--batch_size=-2', '--steps=0'])
def test_bad_shape_and_step_flags_are_refused(flag):
  # 0 used to fall back to the family's default shape (and --steps=0 timed nothing), silently.
  from absl import flags
  with flagsaver.flagsaver():
    with pytest.raises(flags.IllegalFlagValueError, match=flag.split('=')[0][2:]):
      benchmark.FLAGS(['benchmark', '--model=gpt2', flag])


def test_the_command_line_quotes_its_values():
  # --xla_flags holds several XLA flags, space-separated: unquoted, the shell splits them into
  # arguments of the benchmark's own.
  import shlex
  opts = benchmark.Options(model='vit', xla_flags='--xla_a=1 --xla_b=2', profile_dir='/tmp/my dir')
  words = shlex.split(benchmark.command_line(opts, '/tmp/out dir/r.json'))
  assert words[:3] == ['python', '-m', 'experiments.benchmark']
  assert '--xla_flags=--xla_a=1 --xla_b=2' in words
  assert '--profile_dir=/tmp/my dir' in words and words[-1] == '--json_out=/tmp/out dir/r.json'
