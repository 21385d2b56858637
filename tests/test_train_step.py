"""The trainer's step options: gradient accumulation, mixed precision, remat/scan, MFU."""

import glob
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from experiments import train
from ptm_jax.models import gpt2, registry
from ptm_jax.train import hardware, objectives, profiling
from ptm_jax.train.config import base_config, finalize

TINY_GPT2 = gpt2.GPT2Config(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2,
                            max_position_embeddings=16, dropout=0.0, embedding_dropout=0.0,
                            attention_dropout=0.0)


def _lm_batch(batch_size=8, length=12, seed=0):
  """A causal-LM batch whose rows have very different numbers of real (non -100) labels."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 50, (batch_size, length)).astype(np.int32)
  labels = np.roll(ids, -1, axis=1)
  for row in range(batch_size):
    labels[row, 1 + row * length // (batch_size + 1):] = -100   # 1 .. length-1 real labels
  return {'input_ids': ids, 'labels': labels}


LEARNING_RATE = 0.5


def _steps(accum_steps, return_loss=False):
  config = finalize(base_config())
  config.data.task = 'causal_lm'
  config.optimizer.grad_accum_steps = accum_steps
  module = gpt2.GPT2(TINY_GPT2, head='lm')
  # SGD: linear in the gradient; Adam would magnify float noise in tiny ones.
  tx = optax.sgd(LEARNING_RATE)
  steps = train.make_steps(module, 'gpt2', config, tx)
  params = nn.unbox(module.init(jax.random.key(0), **module.example_inputs()))['params']
  state = {'step': jnp.int32(0), 'params': params, 'opt_state': tx.init(params), 'extra': {},
           'rng': jax.random.key(1)}
  step = jax.jit(lambda state, batch: steps.train(state, {}, batch))  # nothing frozen
  return (step, state, steps.loss) if return_loss else (step, state)


def test_the_step_follows_the_gradient_of_the_mean_loss():
  """The step differentiates the summed token losses and divides by the count afterwards
  (objectives.SUM_REDUCIBLE): its update must be that of the mean loss's gradient. A batch with
  no scored token gives loss 0 and no update, not NaN."""
  step, state, loss_fn = _steps(1, return_loss=True)
  batch = _lm_batch(seed=3)
  mean_loss = lambda p: loss_fn(p, {}, {}, batch, True, jax.random.key(0))[0]
  loss, grads = jax.jit(jax.value_and_grad(mean_loss))(state['params'])
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics['grad_norm'], optax.tree.norm(grads), rtol=1e-5)
  jax.tree.map(lambda new, old, g: np.testing.assert_allclose(
      new, old - LEARNING_RATE * g, rtol=1e-5, atol=1e-7),
      new_state['params'], state['params'], grads)

  unscored = dict(batch, labels=np.full_like(batch['labels'], objectives.IGNORE_INDEX))
  new_state, metrics = step(state, unscored)
  assert float(metrics['loss']) == 0.0 and int(metrics['num_tokens']) == 0
  assert float(metrics['grad_norm']) == 0.0
  jax.tree.map(np.testing.assert_array_equal, new_state['params'], state['params'])


def test_a_data_parallel_step_waits_on_one_all_reduce():
  """Data-parallel over 8 devices, the compiled step has one all-reduce: the gradients, the
  summed loss and the float32 token count together. (The mean's int32 count and a barrier
  predicate read from the activations each added one that held up the backward pass.)"""
  step, state = _steps(1)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  batch = jax.device_put(_lm_batch(), NamedSharding(mesh, PartitionSpec('data')))
  state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  hlo = step.lower(state, batch).compile().as_text()
  all_reduces = [line for line in hlo.splitlines()
                 if re.search(r'= .* all-reduce(-start)?\(', line)]
  assert len(all_reduces) == 1, '\n'.join(line[:160] for line in all_reduces)


def test_gradient_accumulation_equals_one_big_batch():
  """4 micro-batches of unequal token counts: same loss, token count and update as one batch."""
  big_step, big_state = _steps(1)
  accum_step, accum_state = _steps(4)
  for seed in range(3):
    batch = _lm_batch(seed=seed)
    big_state, big_metrics = big_step(big_state, batch)
    accum_state, accum_metrics = accum_step(accum_state, batch)
    assert float(accum_metrics['num_tokens']) == float(big_metrics['num_tokens'])
    np.testing.assert_allclose(accum_metrics['loss'], big_metrics['loss'], rtol=1e-6)
    np.testing.assert_allclose(accum_metrics['grad_norm'], big_metrics['grad_norm'], rtol=1e-5)
    # exp of the accumulated mean loss (a mean of the micro-batches' exps is larger).
    np.testing.assert_allclose(accum_metrics['perplexity'], big_metrics['perplexity'], rtol=1e-5)
    np.testing.assert_allclose(accum_metrics['perplexity'], np.exp(accum_metrics['loss']),
                               rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               accum_state['params'], big_state['params'])


def test_accumulation_with_ewc_reports_the_same_loss_and_perplexity():
  # The step's loss carries EWC's term; the perplexity is the objective's own, exp(its loss).
  def ewc_steps(accum_steps):
    config = finalize(base_config())
    config.data.task = 'causal_lm'
    config.optimizer.grad_accum_steps = accum_steps
    config.adapt.ewc.weight = 0.05
    config.adapt.source = {'classes': (0,)}
    module = gpt2.GPT2(TINY_GPT2, head='lm')
    tx = optax.sgd(LEARNING_RATE)
    steps = train.make_steps(module, 'gpt2', config, tx)
    params = nn.unbox(module.init(jax.random.key(0), **module.example_inputs()))['params']
    anchor = jax.tree.map(lambda p: p + 0.1, params)
    constants = {'ewc': {'anchor': anchor, 'fisher': jax.tree.map(jnp.ones_like, params)}}
    state = {'step': jnp.int32(0), 'params': params, 'opt_state': tx.init(params), 'extra': {},
             'rng': jax.random.key(1)}
    return jax.jit(lambda state, batch: steps.train(state, constants, batch)), state

  batch = _lm_batch(seed=5)
  (big_step, big_state), (accum_step, accum_state) = ewc_steps(1), ewc_steps(4)
  _, big = big_step(big_state, batch)
  _, accum = accum_step(accum_state, batch)
  assert float(big['ewc_penalty']) > 0
  for key in ('loss', 'perplexity', 'ewc_penalty'):
    np.testing.assert_allclose(accum[key], big[key], rtol=1e-5, err_msg=key)
  # The loss holds EWC's term; the perplexity does not.
  penalty_term = 0.5 * 0.05 * float(big['ewc_penalty'])
  np.testing.assert_allclose(np.log(accum['perplexity']), float(accum['loss']) - penalty_term,
                             rtol=1e-5)


def test_equal_weighting_would_differ_so_the_test_above_can_fail():
  """Guards the test above: the per-micro-batch mean losses do not average to the batch loss."""
  batch = _lm_batch()
  module = gpt2.GPT2(TINY_GPT2, head='lm')
  params = nn.unbox(module.init(jax.random.key(0), **module.example_inputs()))
  logits = jax.jit(lambda ids: module.apply(params, ids).logits)
  loss_of = lambda rows: float(objectives.causal_lm_loss(
      logits(batch['input_ids'][rows]), batch['labels'][rows])[0])
  losses = [loss_of(slice(i, None, 4)) for i in range(4)]
  assert abs(np.mean(losses) - loss_of(slice(None))) > 1e-3


def _digits_config(**overrides):
  config = base_config()
  config.total_steps, config.batch_size, config.log_every, config.eval_every = 3, 16, 1, 0
  config.eval_steps, config.checkpoint_every = 2, 0
  config.data.name, config.data.image_size, config.data.channels = 'digits', 8, 1
  config.data.augment = 'none'
  config.model.name = 'vit-ti/16'
  config.model.update(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
                      patch_size=4)
  config.optimizer.update(name='adamw', learning_rate=1e-3, warmup_steps=0)
  config.update_from_flattened_dict(overrides)
  return config


def _train_losses(workdir):
  return [r['loss'] for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))
          if r['split'] == 'train']


def test_trainer_runs_with_accumulation_remat_scan_and_bf16(tmp_path):
  ref = train.train_and_evaluate(_digits_config(), str(tmp_path / 'ref'))
  ref_losses = _train_losses(tmp_path / 'ref')
  # Accumulation over 2 micro-batches and a rematerialised, scanned stack: the same training.
  # It also evaluates in one batch of 32 (the reference: two of 16, the same examples) and
  # writes a profile of its second step.
  other = train.train_and_evaluate(
      _digits_config(**{'optimizer.grad_accum_steps': 2, 'model.remat': 'full',
                        'model.scan_layers': True, 'eval_batch_size': 32, 'eval_steps': 1,
                        'profile.start_step': 1, 'profile.num_steps': 1}),
      str(tmp_path / 'accum_scan'))
  np.testing.assert_allclose(_train_losses(tmp_path / 'accum_scan'), ref_losses, rtol=1e-5)
  assert other['total_params'] == ref['total_params']
  # MFU's FLOPs count every layer of the scanned stack (XLA counts a loop's body once).
  np.testing.assert_allclose(other['model_flops_per_step'], ref['model_flops_per_step'],
                             rtol=1e-3)
  assert other['eval']['num_examples'] == ref['eval']['num_examples'] == 32
  np.testing.assert_allclose(other['eval']['loss'], ref['eval']['loss'], rtol=1e-5)
  profile_dir = tmp_path / 'accum_scan' / 'profile'
  assert glob.glob(str(profile_dir / '**' / '*.xplane.pb'), recursive=True)
  # The trace holds that one step on each device, its ops named by source (the step's text).
  profile = profiling.summarize(profiling.find_trace(str(profile_dir)),
                                (profile_dir / 'train_step.hlo.txt').read_text())
  step_profiles = [m for m in profile['modules'] if m['module'] == 'jit_train_step']
  assert step_profiles and all(m['executions'] == 1 for m in step_profiles)
  assert all(m['by_phase'].get('backward', 0) > 0 for m in step_profiles)
  # bf16 compute, float32 master weights: close to float32 training, not equal to it. (Measured:
  # within 1e-4 relative. With no update at all, as bf16 weights lose small ones, the 2nd and 3rd
  # losses are 4% and 1.3% off: rtol=3e-2 let step 3 through.)
  bf16 = train.train_and_evaluate(_digits_config(**{'model.dtype': 'bfloat16'}),
                                  str(tmp_path / 'bf16'))
  bf16_losses = _train_losses(tmp_path / 'bf16')
  np.testing.assert_allclose(bf16_losses, ref_losses, rtol=2e-3)
  assert bf16_losses != ref_losses
  assert bf16['param_dtypes'] == ['float32'] and bf16['compute_dtype'] == 'bfloat16'


def test_accumulation_that_does_not_divide_the_batch_is_refused(tmp_path):
  with pytest.raises(ValueError, match='grad_accum_steps=3 .* multiple of 24'):
    train.train_and_evaluate(_digits_config(**{'optimizer.grad_accum_steps': 3}),
                             str(tmp_path))


def test_negative_step_counts_are_refused():
  config = base_config()
  config.eval_every = -5
  with pytest.raises(ValueError, match=r'config.eval_every=-5 is negative.*0 \(evaluate only'):
    finalize(config)


@pytest.mark.parametrize('override, message', [
    ('--config.optimizer.lr=1', r"--config.optimizer.lr: unknown config key optimizer.lr; known "
                                r"keys under optimizer: \[.*'learning_rate'"),
    ('--config.optimzer.lr=1', r'unknown config key optimzer \(Did you mean "optimizer"'),
])
def test_an_unknown_config_override_is_a_flag_error_that_names_it(monkeypatch, capsys, override,
                                                                   message):
  from absl.testing import flagsaver
  digits = os.path.join(os.path.dirname(__file__), '..', 'configs', 'digits.py')
  argv = ['train', f'--config={digits}:runlocal', '--workdir=/tmp/unused', override]
  monkeypatch.setattr('sys.argv', argv)  # ml_collections reads the overrides from sys.argv
  with flagsaver.flagsaver(), pytest.raises(SystemExit):
    train._parse_flags(argv)
  assert re.search(f'FATAL Flags parsing error: .*{message}', capsys.readouterr().err)


def test_a_missing_config_file_is_a_flag_error_that_names_it(monkeypatch, capsys):
  from absl.testing import flagsaver
  argv = ['train', '--config=configs/no_such.py:runlocal', '--workdir=/tmp/unused']
  monkeypatch.setattr('sys.argv', argv)
  with flagsaver.flagsaver(), pytest.raises(SystemExit):
    train._parse_flags(argv)
  assert re.search(r"--config: the config file could not be loaded \(.*No such file or "
                   r"directory: 'configs/no_such.py'\)\. Give an existing configs/NAME.py",
                   capsys.readouterr().err)


def test_mfu_formula_and_xla_flop_count():
  m, k, n = 64, 32, 16
  lowered = jax.jit(lambda a, b: a @ b).lower(jnp.zeros((m, k)), jnp.zeros((k, n)))
  assert hardware.flops_of(lowered) == 2 * m * k * n
  h100 = type('Device', (), {'device_kind': 'NVIDIA H100 80GB HBM3'})()
  assert hardware.peak_flops(h100) == 989e12
  assert hardware.mfu(989e12, 2.0, 4, h100) == pytest.approx(1 / 8)
  assert hardware.peak_flops(jax.devices('cpu')[0]) is None
  assert hardware.mfu(1e9, 1.0, 1, jax.devices('cpu')[0]) is None


def test_remat_and_scan_are_refused_for_resnet():
  model = base_config().model
  model.remat = 'full'
  with pytest.raises(ValueError, match='ResNet has none'):
    registry.layer_stack_of(model, 'resnet')
  assert registry.layer_stack_of(model, 'vit').remat == 'full'


def _checkpoint_steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints')) if p.isdigit())


@pytest.mark.parametrize('learning_rate, message, stop_step', [
    (1e38, r'Loss is .* at step (\d)', 2),                  # huge parameters, then a NaN loss
    (float('inf'), r'parameters are not finite after step (\d)', 1),  # the first update's are
])
def test_a_nan_between_log_steps_stops_before_it_is_checkpointed(tmp_path, learning_rate,
                                                                  message, stop_step):
  # A learning rate that blows the parameters up at the first update; the loss is logged only
  # at the end, but a checkpoint is due every step: none may hold the non-finite state.
  config = _digits_config(**{'total_steps': 6, 'log_every': 100, 'checkpoint_every': 1,
                             'optimizer.learning_rate': learning_rate, 'optimizer.name': 'sgd',
                             'optimizer.momentum': 0.0})
  kept = (r'last good checkpoint \(step 1\)' if stop_step > 1
          else 'No checkpoint had been saved yet')  # not 'step None'
  with pytest.raises(FloatingPointError, match=message + '.*' + kept) as error:
    train.train_and_evaluate(config, str(tmp_path))
  # Stopped at the first non-finite state, not left to the last step's log.
  assert int(re.search(message, str(error.value)).group(1)) == stop_step
  saved = _checkpoint_steps(tmp_path)
  assert saved == list(range(1, stop_step))
  if saved:  # the checkpoints kept hold finite parameters
    from ptm_jax.train import checkpointing
    latest = checkpointing.Checkpointer(str(tmp_path / 'checkpoints')).restore(None)
    assert latest is not None and bool(train._all_finite(latest[1]['params']))


def test_a_failing_final_eval_loses_no_training(tmp_path, monkeypatch):
  # checkpoint_every=0: the final step's checkpoint is the run's only one. It is saved before
  # the final eval, so an eval that fails (out of memory, say) leaves the trained state behind,
  # and the run started again only evaluates.
  def failing_eval(*args, **kwargs):
    raise MemoryError('eval out of memory')
  monkeypatch.setattr(train, 'evaluate', failing_eval)
  with pytest.raises(MemoryError):
    train.train_and_evaluate(_digits_config(), str(tmp_path))
  assert _checkpoint_steps(tmp_path) == [3]
  monkeypatch.undo()
  losses = _train_losses(tmp_path)
  summary = train.train_and_evaluate(_digits_config(), str(tmp_path))
  assert summary['final_step'] == 3 and summary['eval']['loss'] > 0
  assert _train_losses(tmp_path) == losses  # no step was trained again


def test_a_finished_run_started_again_keeps_its_summary(tmp_path, capsys):
  config = _digits_config()
  first = train.train_and_evaluate(config, str(tmp_path))
  summary_text = (tmp_path / 'summary.json').read_text()
  log_lines = (tmp_path / 'metrics.jsonl').read_text()
  assert first['eval'] and first['train']
  again = train.train_and_evaluate(_digits_config(), str(tmp_path))
  assert 'already reached step 3' in capsys.readouterr().out
  assert again == json.loads(summary_text)
  assert (tmp_path / 'summary.json').read_text() == summary_text
  assert (tmp_path / 'metrics.jsonl').read_text() == log_lines
  # A dry run in the finished run's workdir leaves its summary.json alone.
  dry = train.train_and_evaluate(_digits_config(), str(tmp_path), dry_run=True)
  assert dry['dry_run'] and (tmp_path / 'summary.json').read_text() == summary_text
  assert json.loads((tmp_path / train.DRY_RUN_SUMMARY_FILE).read_text())['dry_run']
  # A summary of another step (an earlier total_steps the run went past): evaluated again.
  (tmp_path / 'summary.json').write_text(json.dumps(dict(first, final_step=2, eval={})))
  assert train.train_and_evaluate(_digits_config(), str(tmp_path))['eval']
  assert json.loads((tmp_path / 'summary.json').read_text())['final_step'] == 3
  # Without its summary.json (killed after the last checkpoint): evaluated again, not emptied.
  (tmp_path / 'summary.json').unlink()
  redone = train.train_and_evaluate(_digits_config(), str(tmp_path))
  assert redone['final_step'] == 3
  np.testing.assert_allclose(redone['eval']['loss'], first['eval']['loss'], rtol=1e-6)
  assert redone['eval']['num_examples'] == first['eval']['num_examples']


def test_seconds_per_step_leaves_out_only_the_first_log_interval(tmp_path):
  summary = train.train_and_evaluate(_digits_config(**{'total_steps': 5}), str(tmp_path))
  rates = [r['steps_per_sec'] for r in map(json.loads, open(tmp_path / 'metrics.jsonl'))
           if r['split'] == 'train']
  assert len(rates) == 5  # log_every=1
  np.testing.assert_allclose(summary['seconds_per_step'], np.mean([1 / r for r in rates[1:]]),
                             rtol=1e-3)


def test_log_every_0_logs_only_the_last_step(tmp_path):
  # As eval_every=0 and checkpoint_every=0 mean "only at the end" (it divided by zero).
  summary = train.train_and_evaluate(_digits_config(**{'log_every': 0}), str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [(r['step'], r['split']) for r in records] == [(3, 'train'), (3, 'eval')]
  assert summary['train']['loss'] == records[0]['loss'] and summary['seconds_per_step'] > 0


def test_a_run_resumes_onto_another_mesh(tmp_path):
  # The checkpoint restores onto any mesh, so config.mesh may change between a run and its
  # resumption (the workdir guard refused it as another config's run).
  reference = train.train_and_evaluate(_digits_config(**{'total_steps': 5}),
                                       str(tmp_path / 'ref'))
  train.train_and_evaluate(_digits_config(), str(tmp_path / 'run'))  # data=8, 3 steps
  resumed = train.train_and_evaluate(
      _digits_config(**{'total_steps': 5, 'mesh.data': 2, 'mesh.fsdp': 4}), str(tmp_path / 'run'))
  assert resumed['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert [r['step'] for r in map(json.loads, open(tmp_path / 'run' / 'metrics.jsonl'))
          if r['split'] == 'train'] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose(_train_losses(tmp_path / 'run'), _train_losses(tmp_path / 'ref'),
                             rtol=1e-5)
  np.testing.assert_allclose(resumed['eval']['loss'], reference['eval']['loss'], rtol=1e-5)


def _tensorboard_events(folder):
  """Every Event of the TFRecord files in `folder` (length, crc, payload, crc records)."""
  from tensorboardX.proto import event_pb2
  events = []
  for name in sorted(os.listdir(folder)):
    data = open(os.path.join(folder, name), 'rb').read()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], 'little')
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12:offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events


def test_a_resumed_run_tells_tensorboard_to_drop_the_redone_steps(tmp_path):
  from tensorboardX.proto import event_pb2
  for start, workdir in ((0, tmp_path / 'fresh'), (4, tmp_path / 'resumed')):
    workdir.mkdir()
    writer = train.MetricWriter(str(workdir), 10, True, start_step=start)
    writer.write({'step': start + 1, 'split': 'train', 'loss': 1.0})
    writer.close()
    events = _tensorboard_events(workdir / 'tensorboard')
    purges = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert purges == ([5] if start else [])  # TensorBoard drops the old events from step 5 on
    assert [e.step for e in events if e.summary.value] == [start + 1]
