"""What trains (ptm_jax.adapt.rules): treatments, layer groups, multipliers, gradual unfreezing,
and the trainer keeping frozen parameters bit-identical."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import train
from ptm_jax.adapt import config as adapt_config
from ptm_jax.adapt import ewc, methods, rules
from ptm_jax.data import pipeline
from ptm_jax.models import gpt2, resnet
from ptm_jax.train.config import base_config, finalize
from tests import adapt_runs

def _vit_params():
  """A parameter tree shaped like a 3-layer ViT classifier's (values are irrelevant)."""
  leaf = lambda *shape: jnp.ones(shape)
  layer = {'attention': {n: {'kernel': leaf(4, 4), 'bias': leaf(4)}
                         for n in ('query', 'key', 'value', 'out')},
           'ln_attention': {'scale': leaf(4), 'bias': leaf(4)},
           'mlp': {'fc_in': {'kernel': leaf(4, 8), 'bias': leaf(8)}}}
  return {'vit': {'cls_token': leaf(1, 1, 4), 'position_embeddings': leaf(1, 5, 4),
                  'patch_embedding': {'projection': {'kernel': leaf(2, 2, 1, 4)}},
                  **{f'layer_{i}': layer for i in range(3)},
                  'final_ln': {'scale': leaf(4), 'bias': leaf(4)}},
          'classifier': {'kernel': leaf(4, 3), 'bias': leaf(3)}}


def test_layer_depths_count_from_the_top():
  depths = rules.layer_depths(rules.flatten(_vit_params()))
  assert depths['classifier/kernel'] == 0 and depths['vit/final_ln/scale'] == 0
  assert depths['vit/layer_2/attention/query/kernel'] == 1
  assert depths['vit/layer_0/mlp/fc_in/bias'] == 3
  assert depths['vit/cls_token'] == depths['vit/patch_embedding/projection/kernel'] == 4
  resnet = rules.layer_depths(['resnet/stage_3_block_1/conv_0/conv/kernel',
                               'resnet/stage_0_block_0/conv_0/conv/kernel',
                               'resnet/stem/conv/kernel', 'classifier/kernel'])
  assert list(resnet.values()) == [1, 4, 5, 0]



def test_clip_pre_layernorm_is_in_the_embedding_group():
  """CLIP vision's pre-LayerNorm sits on the embeddings, below every block (as BERT's
  embeddings_ln): the deepest group, not the top one with the head and the final norms."""
  depths = rules.layer_depths(['vision_model/patch_embedding/projection/kernel',
                               'vision_model/pre_layernorm/scale',
                               'vision_model/layer_0/mlp/fc_in/kernel',
                               'vision_model/layer_1/mlp/fc_in/kernel',
                               'vision_model/post_layernorm/scale', 'visual_projection/kernel'])
  assert list(depths.values()) == [3, 3, 2, 1, 0, 0]

def test_method_defaults_rules_and_multipliers():
  params = _vit_params()
  frozen = rules.treatments(params, {'method': 'frozen'}, 'vit')
  assert {p for p, r in frozen.items() if r} == {'classifier/kernel', 'classifier/bias'}
  # First matching rule wins; a float is a learning-rate multiplier.
  custom = rules.treatments(params, {'method': 'frozen', 'rules': (
      (r'layer_2/attention/(query|value)/kernel$', 0.5), (r'layer_2/', 'train'),
      (r'^classifier/bias$', 'freeze'))}, 'vit')
  assert custom['vit/layer_2/attention/query/kernel'] == 0.5
  assert custom['vit/layer_2/attention/key/kernel'] == 1.0
  assert custom['vit/layer_1/attention/key/kernel'] == 0.0
  assert custom['classifier/bias'] == 0.0 and custom['classifier/kernel'] == 1.0
  # Layer-wise learning-rate decay for full fine-tuning: decay ** depth.
  decayed = rules.treatments(params, {'method': 'full', 'layer_lr_decay': 0.5}, 'vit')
  assert decayed['classifier/kernel'] == 1.0
  assert decayed['vit/layer_0/attention/query/kernel'] == 0.5 ** 3
  assert decayed['vit/cls_token'] == 0.5 ** 4


def test_bad_treatments_fail_clearly():
  params = _vit_params()
  with pytest.raises(ValueError, match='trains no parameter'):
    rules.treatments(params, {'method': 'frozen', 'head': r'^nothing$'}, 'vit')
  with pytest.raises(ValueError, match='not one of'):
    rules.treatments(params, {'method': 'lorax'}, 'vit')
  with pytest.raises(ValueError, match='Unknown config key adapt.lora.rnk'):
    rules.treatments(params, {'method': 'lora', 'lora': {'rnk': 4}}, 'vit')
  quantised = dict(params, codes=jnp.zeros((8,), jnp.uint8))
  with pytest.raises(ValueError, match='quantised frozen weight'):
    rules.treatments(quantised, {'method': 'full'}, 'vit')


def test_split_and_combine_round_trip():
  params = _vit_params()
  rates = rules.treatments(params, {'method': 'frozen'}, 'vit')
  trainable, frozen = rules.split(params, rates)
  assert list(trainable) == ['classifier']
  assert rules.flatten(trainable).keys() == {p for p, r in rates.items() if r > 0}
  assert rules.flatten(frozen).keys() == {p for p, r in rates.items() if r == 0}
  # Every leaf a different value: a leaf put back in another's place fails.
  flat = rules.flatten(params)
  params = rules.unflatten({p: jnp.full(v.shape, i, jnp.float32)
                            for i, (p, v) in enumerate(sorted(flat.items()))})
  back = rules.combine(*rules.split(params, rates))
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_rate_transform_scales_updates_and_holds_leaves_until_they_start():
  """SGD (update = -lr g): multipliers scale it; before its start step a leaf gets 0 and its
  optimizer sees a zero gradient."""
  params = {'a': jnp.ones(3), 'b': jnp.ones(3)}
  grads = {'a': jnp.full(3, 2.0), 'b': jnp.full(3, 2.0)}
  before, after = rules.rate_transform({'a': 1.0, 'b': 0.25}, {'a': 0, 'b': 2})
  tx = optax.chain(before, optax.sgd(0.1, momentum=0.9), after)
  state = tx.init(params)
  trace = []
  for _ in range(4):
    updates, state = tx.update(grads, state, params)
    trace.append({k: float(v[0]) for k, v in updates.items()})
  # a: momentum SGD from step 0; b: nothing at steps 0 and 1, then a fresh momentum trace.
  np.testing.assert_allclose([t['a'] for t in trace], [-0.2, -0.38, -0.542, -0.6878], rtol=1e-6)
  np.testing.assert_allclose([t['b'] for t in trace], [0.0, 0.0, -0.05, -0.095], rtol=1e-6)


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_gradual_unfreezing_rates_and_schedule_in_the_trainers_optimizer(optimizer):
  """Gradients of ones: a leaf at depth d moves by factor**-d x the step's learning rate from
  step d * every on, and not before; every = total_steps // (groups + 1) when not set; a
  scanned stack is refused. SGD (no momentum) follows a linear decay at the global step. Adam's
  first step on a group is Adam's first step (bias-corrected moments of one gradient: exactly
  1), however late the group unfreezes: each group's state starts at its own step."""
  params = _vit_params()
  rates = rules.treatments(params, {'method': 'gradual_unfreeze'}, 'vit')
  trainable, _ = rules.split(params, rates)
  depths = rules.layer_depths(rules.flatten(trainable))
  assert sorted(set(depths.values())) == [0, 1, 2, 3, 4]  # head, 3 layers, embeddings
  adapt = adapt_config.merged_config({'method': 'gradual_unfreeze',
                                      'gradual': {'factor': 2.0, 'unfreeze_every': 0}})
  optimizer_config = ({'name': 'sgd', 'learning_rate': 1.0, 'momentum': 0.0,
                       'schedule': 'linear', 'min_learning_rate': 0.1} if optimizer == 'sgd'
                      else {'name': 'adam', 'learning_rate': 1.0})
  tx, schedule = train._adapted_optimizer(optimizer_config, rates, trainable, adapt,
                                          total_steps=12)
  every = 12 // (5 + 1)
  state = jax.jit(tx.init)(trainable)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, trainable)
  for step in range(12):
    updates, state = update(grads, state, trainable)
    lr = float(schedule(step)) if optimizer == 'sgd' else 1.0
    for path, leaf_update in rules.flatten(updates).items():
      d = depths[path]
      expected = -lr * 2.0 ** -d if step >= d * every else 0.0
      np.testing.assert_allclose(leaf_update, expected, rtol=2e-5,  # Adam: float32 (1 - b2)
                                 err_msg=f'{path} at step {step}')
  scanned = {'vit': {'layers': {'mlp': {'kernel': jnp.ones((3, 4, 4))}}},
             'classifier': {'kernel': jnp.ones((4, 3))}}
  with pytest.raises(ValueError, match='scan_layers=False'):
    train._adapted_optimizer(optimizer_config, {p: 1.0 for p in rules.flatten(scanned)},
                             scanned, adapt, total_steps=12)


# ------------------------------------------------------------------------------------------------
# Through the trainer: digits ViT, a few steps, a checkpoint after every step.

STEPS = 6


def _run(tmp_path, name, **adapt):
  # Weight decay on: decay too must leave frozen parameters alone.
  return adapt_runs.digits_run(tmp_path / name, STEPS, weight_decay=0.1, **adapt)


_read = adapt_runs.trained_params


def test_frozen_method_checkpoints_and_trains_only_the_head(tmp_path):
  summary, ckpt = _run(tmp_path, 'frozen', method='frozen')
  first, last = _read(ckpt, 1), _read(ckpt, STEPS)
  assert set(last) == {'classifier/kernel', 'classifier/bias'}   # no backbone in checkpoints
  assert all(not np.array_equal(first[p], last[p]) for p in last)
  assert summary['trainable_params'] == sum(v.size for v in last.values())
  assert 0 < summary['trainable_percent'] < 5 and summary['adapt_method'] == 'frozen'


def test_gradual_unfreezing_follows_its_schedule_step_by_step(tmp_path):
  """Group at depth d starts training at step d * unfreeze_every: its parameters stay
  bit-identical in every checkpoint up to that step and change right after."""
  every = 1
  _, ckpt = _run(tmp_path, 'gradual', method='gradual_unfreeze',
                 gradual={'unfreeze_every': every, 'factor': 2.6})
  by_step = {s: _read(ckpt, s) for s in range(1, STEPS + 1)}
  depths = rules.layer_depths(by_step[1])
  assert max(depths.values()) == 3   # head, layer_1, layer_0, embeddings
  for path, depth in depths.items():
    start = depth * every   # the first update (0-based) that changes this group
    for step in range(2, STEPS + 1):  # checkpoint `step` holds the params after updates < step
      same = np.array_equal(by_step[step][path], by_step[step - 1][path])
      if step - 1 < start:
        assert same, f'{path} (depth {depth}) changed by update {step - 1} before {start}'
      elif step - 1 == start and by_step[step][path].ndim > 1:
        assert not same, f'{path} (depth {depth}) did not start at update {start}'


def test_lora_run_trains_only_the_branches_and_the_head(tmp_path):
  summary, ckpt = _run(tmp_path, 'lora', method='lora', lora={'rank': 2})
  last = _read(ckpt, STEPS)
  assert all(p.endswith(('lora_a', 'lora_b')) or p.startswith('classifier/') for p in last)
  assert any(p.endswith('lora_b') and np.abs(v).max() > 0 for p, v in last.items())
  assert summary['trainable_params'] == sum(v.size for v in last.values())
  assert summary['trainable_params'] < 0.2 * summary['total_params']


# ------------------------------------------------------------------------------------------------
# Against forgetting: EWC and rehearsal, with the source task's accuracy before and after.


def test_fisher_is_the_mean_of_per_example_squared_gradients():
  """Logistic regression: d loss_n / d w = (sigmoid(w.x_n) - y_n) x_n, in closed form."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 3)).astype(np.float32)
  y = (rng.random(12) > 0.5).astype(np.float32)
  w = jnp.asarray(rng.normal(size=3).astype(np.float32))

  def loss(params, batch):
    logits = batch['x'] @ params['w']
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch['y']))

  batches = [{'x': x[:8], 'y': y[:8]}, {'x': x[8:], 'y': y[8:]}]  # unequal sizes
  fisher = ewc.fisher_diagonal(loss, {'w': w}, batches)
  p = 1 / (1 + np.exp(-(x @ np.asarray(w))))
  expected = np.mean(((p - y)[:, None] * x) ** 2, axis=0)
  np.testing.assert_allclose(fisher['w'], expected, rtol=1e-5)
  penalty = ewc.penalty({'w': w + 1.0}, {'w': w}, fisher)
  np.testing.assert_allclose(penalty, expected.sum(), rtol=1e-5)


def test_the_train_step_adds_the_ewc_penalty_and_its_gradient():
  """loss + weight / 2 * sum F (theta - theta*)^2, and its gradient weight * F * (theta - theta*),
  in the trainer's own step."""
  config = finalize(base_config())
  config.data.task = 'causal_lm'
  config.adapt.method = 'full'
  config.adapt.source = {'classes': (0,)}   # EWC needs a source task; the data is not read here
  config.adapt.ewc.weight = 3.0
  module = gpt2.GPT2(gpt2.GPT2Config(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2,
                                     max_position_embeddings=8), head='lm')
  steps = train.make_steps(module, 'gpt2', config, optax.sgd(1.0))
  params = nn.unbox(module.init(jax.random.key(0), **module.example_inputs()))['params']
  ids = np.arange(16, dtype=np.int32).reshape(2, 8) % 40
  batch = {'input_ids': ids, 'labels': np.roll(ids, -1, axis=1)}
  anchor = jax.tree.map(lambda x: x + 0.01, params)
  fisher = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  value_and_grad = jax.jit(jax.value_and_grad(steps.loss, has_aux=True), static_argnums=4)
  (plain, _), plain_grads = value_and_grad(params, {}, {}, batch, True, jax.random.key(1))
  (held, (metrics, _)), held_grads = value_and_grad(
      params, {'ewc': {'anchor': anchor, 'fisher': fisher}}, {}, batch, True, jax.random.key(1))
  penalty = sum(float(jnp.sum(0.5 * 0.01 ** 2 * jnp.ones_like(x)))
                for x in jax.tree.leaves(params))
  np.testing.assert_allclose(metrics['ewc_penalty'], penalty, rtol=1e-3)
  np.testing.assert_allclose(held - plain, 0.5 * 3.0 * penalty, rtol=1e-3)
  jax.tree.map(lambda h, p: np.testing.assert_allclose(h - p, 3.0 * 0.5 * -0.01, atol=1e-6),
               held_grads, plain_grads)


def test_lora_dropout_on_a_resnet_with_frozen_batch_statistics():
  """LoRA on a ResNet keeps the checkpoint's BatchNorm statistics (the inference form of the
  network) but its dropout still draws in training: a dropout key per step, outputs that differ
  between keys once B != 0, and none of it in evaluation."""
  config = finalize(base_config())
  config.data.task = 'image_classification'
  config.adapt.method = 'lora'
  config.adapt.lora.dropout = 0.5
  config.adapt.lora.targets = r'conv$'
  module = resnet.ResNet(dataclasses.replace(resnet.PRESETS['resnet18'], num_labels=3,
                                             hidden_sizes=(8, 8, 8, 8), embedding_size=8),
                         head='classification')
  pixels = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  with methods.applied(config.adapt):  # jitted: one compile, not op-by-op dispatch
    variables = nn.unbox(jax.jit(module.init)(jax.random.key(0), pixel_values=pixels))
  flat = rules.flatten(variables['params'])
  assert any(p.endswith('lora_b') for p in flat)
  keys = jax.random.split(jax.random.key(2), len(flat))
  flat = {p: (0.1 * jax.random.normal(k, v.shape) if p.endswith('lora_b') else v)
          for k, (p, v) in zip(keys, sorted(flat.items()))}
  params = rules.unflatten(flat)
  extra = {'batch_stats': variables['batch_stats']}
  steps = train.make_steps(module, 'resnet', config, optax.sgd(1.0))
  batch = {'image': pixels, 'label': np.array([0, 2], np.int32)}
  loss = jax.jit(steps.loss, static_argnums=4)
  train_a, (_, extra_a) = loss(params, {}, extra, batch, True, jax.random.key(3))
  train_b, _ = loss(params, {}, extra, batch, True, jax.random.key(4))
  eval_a, _ = loss(params, {}, extra, batch, False, jax.random.key(3))
  eval_b, _ = loss(params, {}, extra, batch, False, jax.random.key(4))
  assert np.isfinite(float(train_a)) and float(train_a) != float(train_b)
  assert float(eval_a) == float(eval_b)
  jax.tree.map(np.testing.assert_array_equal, extra_a, extra)  # the statistics stay frozen


@pytest.mark.parametrize('method,freeze,updated', [('frozen', True, False),
                                                    ('frozen', False, True),
                                                    ('full', True, True)])
def test_batch_statistics_train_unless_frozen(method, freeze, updated):
  """adapt.freeze_batch_stats keeps a frozen ResNet's BatchNorm statistics as loaded; full
  fine-tuning (and freeze_batch_stats=False) updates them in every train step."""
  config = finalize(base_config())
  config.data.task = 'image_classification'
  config.adapt.method = method
  config.adapt.freeze_batch_stats = freeze
  module = resnet.ResNet(dataclasses.replace(resnet.PRESETS['resnet18'], num_labels=3,
                                             hidden_sizes=(8, 8, 8, 8), embedding_size=8),
                         head='classification')
  pixels = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = nn.unbox(module.init(jax.random.key(0), pixel_values=pixels))
  extra = {'batch_stats': variables['batch_stats']}
  steps = train.make_steps(module, 'resnet', config, optax.sgd(1.0))
  batch = {'image': pixels, 'label': np.array([0, 2], np.int32)}
  _, (_, new_extra) = steps.loss(variables['params'], {}, extra, batch, True, jax.random.key(3))
  same = [bool(np.array_equal(a, b)) for a, b in zip(jax.tree.leaves(new_extra),
                                                      jax.tree.leaves(extra))]
  assert len(same) == len(jax.tree.leaves(extra)) > 0
  assert not any(same) if updated else all(same)
  _, (_, eval_extra) = steps.loss(variables['params'], {}, extra, batch, False, None)
  jax.tree.map(np.testing.assert_array_equal, eval_extra, extra)  # evaluation never updates


def test_forgetting_is_reported_with_ewc_and_rehearsal_on(tmp_path):
  """Source: digits 0-4; target: digits 5-9 (both labelled 0-4: one head). The run reports the
  source task's metrics before and after, and logs the EWC penalty every step."""
  summary, _ = _run(tmp_path, 'ewc', method='full', source={'classes': (0, 1, 2, 3, 4)},
                    data={'classes': (5, 6, 7, 8, 9)}, ewc={'weight': 10.0, 'fisher_batches': 2},
                    rehearsal={'fraction': 0.5})
  forgetting = summary['forgetting']
  assert set(forgetting) == {'source_before', 'source_after', 'accuracy_drop'}
  assert forgetting['source_before'] != forgetting['source_after']
  np.testing.assert_allclose(forgetting['accuracy_drop'], forgetting['source_before']['accuracy']
                             - forgetting['source_after']['accuracy'])
  with open(os.path.join(tmp_path / 'ewc', 'metrics.jsonl'), encoding='utf-8') as f:
    penalties = [r['ewc_penalty'] for r in map(json.loads, f) if r['split'] == 'train']
  assert len(penalties) == STEPS and penalties[0] == 0.0 and max(penalties) > 0.0


def test_rehearsal_batches_are_source_rows_then_target_rows():
  mesh = jax.make_mesh((8,), ('data',))
  config = adapt_runs.digits_config()
  loaders = {}
  for name, classes, rows in (('source', (0, 1), 8), ('target', (5, 6), 8)):
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.classes, c.batch_size = classes, rows
    loaders[name] = pipeline.make_loader(c, 'train', train=True)
  mixed = train.RehearsalLoader(loaders['target'], loaders['source'],
                                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  batch = next(mixed)
  loaders['source'].reset()
  loaders['target'].reset()
  expected = np.concatenate([np.asarray(next(loaders['source'])['image']),
                             np.asarray(next(loaders['target'])['image'])])
  np.testing.assert_array_equal(np.asarray(batch['image']), expected)
  state = mixed.get_state()
  assert set(state) == {'target', 'rehearsal'}
  # Resuming from the state, through JSON as the checkpoint keeps it, replays both tasks' next
  # batches.
  state = json.loads(json.dumps(state))
  following = [jax.tree.map(np.asarray, next(mixed)) for _ in range(2)]
  assert not np.array_equal(following[0]['image'], batch['image'])
  mixed.set_state(state)
  for want in following:
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, next(mixed)), want)


@pytest.mark.parametrize('fraction,batch_size,data_parallel,rows', [
    (0.5, 16, 8, 8), (0.25, 16, 2, 4), (0.3, 20, 4, 8), (0.0, 16, 8, 0)])
def test_rehearsal_rows_are_a_multiple_of_the_data_parallel_size(fraction, batch_size,
                                                                  data_parallel, rows):
  adapt = ml_collections.ConfigDict({'rehearsal': {'fraction': fraction}})
  assert train.rehearsal_rows(adapt, batch_size, data_parallel) == rows


@pytest.mark.parametrize('fraction,batch_size,data_parallel', [(0.2, 16, 8), (0.8, 16, 8),
                                                               (1.0, 16, 2)])
def test_a_rehearsal_fraction_that_leaves_a_task_no_rows_is_refused(fraction, batch_size,
                                                                    data_parallel):
  adapt = ml_collections.ConfigDict({'rehearsal': {'fraction': fraction}})
  with pytest.raises(ValueError, match=r'config\.adapt\.rehearsal\.fraction=.*choose a fraction'):
    train.rehearsal_rows(adapt, batch_size, data_parallel)
