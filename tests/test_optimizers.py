"""Optimizers: schedules against transcriptions of nanoGPT's get_lr and ULMFiT's formula, AdamW,
Adam and SGD steps against numpy and torch.optim, masked weight decay, clipping, accumulation and
the config errors."""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from ptm_jax.models import bert, gpt2, layers
from ptm_jax.train import optimizers as opt


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
  """nanoGPT's train.py get_lr, transcribed."""
  if it < warmup_iters:
    return learning_rate * (it + 1) / (warmup_iters + 1)
  if it > lr_decay_iters:
    return min_lr
  decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
  coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
  return min_lr + coeff * (learning_rate - min_lr)


def ulmfit_lr(t, total, lr_max, cut_frac, ratio):
  """ULMFiT's slanted triangular learning rate (Howard & Ruder 2018, eq. 3)."""
  cut = math.floor(total * cut_frac)
  p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
  return lr_max * (1 + p * (ratio - 1)) / ratio


def host_values(schedule, steps):
  return np.array([opt.learning_rate_at(schedule, t) for t in steps])


COSINE = dict(learning_rate=1e-3, schedule='cosine', warmup_steps=100, decay_steps=2000,
              min_learning_rate=1e-4)


def test_cosine_nanogpt_warmup_matches_get_lr_and_traced_float32_agrees():
  schedule = opt.make_schedule(dict(COSINE, warmup_style='nanogpt'), total_steps=2500)
  steps = np.arange(2501)
  expected = np.array([nanogpt_get_lr(t, 1e-3, 100, 2000, 1e-4) for t in steps])
  np.testing.assert_allclose(host_values(schedule, steps), expected, rtol=1e-9, atol=0)
  # Inside the optimizer the step is an int32 array and the schedule computes in float32.
  traced = jax.jit(jax.vmap(schedule))(jnp.arange(2501, dtype=jnp.int32))
  assert traced.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(traced), expected, rtol=2e-6)


def test_cosine_linear_from_zero_warmup():
  schedule = opt.make_schedule(COSINE, total_steps=2000)
  for t in (0, 1, 50, 99):
    assert opt.learning_rate_at(schedule, t) == pytest.approx(1e-3 * t / 100, rel=1e-12, abs=0)
  for t in (100, 101, 1000, 1999, 2000):
    assert opt.learning_rate_at(schedule, t) == pytest.approx(
        nanogpt_get_lr(t, 1e-3, 100, 2000, 1e-4), rel=1e-12)
  assert opt.learning_rate_at(schedule, 100) == pytest.approx(1e-3, rel=1e-12)


def test_slanted_triangular_matches_ulmfit():
  schedule = opt.make_schedule(dict(learning_rate=0.01, schedule='slanted_triangular',
                                    cut_frac=0.1, ratio=32.0), total_steps=1000)
  steps = np.arange(1001)
  expected = np.array([ulmfit_lr(t, 1000, 0.01, 0.1, 32.0) for t in steps])
  np.testing.assert_allclose(host_values(schedule, steps), expected, rtol=1e-9, atol=1e-15)
  assert opt.learning_rate_at(schedule, 100) == pytest.approx(0.01)   # the peak at cut
  # Past T the rate stays at the lowest, lr_max / ratio, instead of going negative.
  assert opt.learning_rate_at(schedule, 1500) == pytest.approx(0.01 / 32)


def test_linear_constant_and_rsqrt_schedules():
  linear = opt.make_schedule(dict(learning_rate=1.0, schedule='linear', warmup_steps=10,
                                  min_learning_rate=0.2), total_steps=110)
  for t, lr in ((0, 0.0), (5, 0.5), (10, 1.0), (60, 0.6), (110, 0.2), (500, 0.2)):
    assert opt.learning_rate_at(linear, t) == pytest.approx(lr, abs=1e-12)

  constant = opt.make_schedule(dict(learning_rate=0.3, warmup_steps=4), total_steps=50)
  for t, lr in ((0, 0.0), (2, 0.15), (4, 0.3), (49, 0.3), (1000, 0.3)):
    assert opt.learning_rate_at(constant, t) == pytest.approx(lr, abs=1e-12)
  no_warmup = opt.make_schedule(dict(learning_rate=0.3), total_steps=50)
  assert opt.learning_rate_at(no_warmup, 0) == 0.3

  rsqrt = opt.make_schedule(dict(learning_rate=2.0, schedule='rsqrt', warmup_steps=100),
                            total_steps=10_000)
  for t, lr in ((50, 1.0), (100, 2.0), (400, 1.0), (10_000, 0.2)):
    assert opt.learning_rate_at(rsqrt, t) == pytest.approx(lr, rel=1e-12)
  rsqrt_no_warmup = opt.make_schedule(dict(learning_rate=2.0, schedule='rsqrt'), 100)
  for t, lr in ((0, 2.0), (1, 2.0), (4, 1.0), (16, 0.5)):
    assert opt.learning_rate_at(rsqrt_no_warmup, t) == pytest.approx(lr, rel=1e-12)


def tiny_params():
  rng = np.random.default_rng(0)
  return {'dense': {'kernel': rng.normal(size=(3, 4)).astype(np.float32),
                    'bias': rng.normal(size=(4,)).astype(np.float32)},
          'norm': {'scale': rng.normal(size=(4,)).astype(np.float32)},
          'embedding': rng.normal(size=(5, 2)).astype(np.float32)}


def tiny_grads(num_steps, seed=1):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), tiny_params())
          for _ in range(num_steps)]


def run_optax(transformation, params, grads):
  params = jax.tree.map(jnp.asarray, params)
  state = transformation.init(params)
  update = jax.jit(transformation.update)
  history = []
  for g in grads:
    updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)
    history.append(jax.tree.map(np.asarray, params))
  return history


def run_torch(optimizer_class, params, grads, groups):
  """torch.optim in float64 on the same pytree; groups: (predicate on the leaf path, options)."""
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  tensors = [torch.tensor(np.asarray(x, np.float64), requires_grad=True)
             for x in jax.tree.leaves(params)]
  param_groups = [dict(options, params=[t for p, t in zip(paths, tensors) if chosen(p)])
                  for chosen, options in groups]
  torch_opt = optimizer_class([g for g in param_groups if g['params']])
  treedef = jax.tree.structure(params)
  history = []
  for g in grads:
    for t, grad in zip(tensors, jax.tree.leaves(g)):
      t.grad = torch.tensor(np.asarray(grad, np.float64))
    torch_opt.step()
    history.append(jax.tree.unflatten(treedef, [t.detach().numpy().copy() for t in tensors]))
  return history


def numpy_adamw(params, grads, lr, b1, b2, eps, weight_decay, decayed, trust_ratio=False):
  """AdamW by hand in float64: bias-corrected moments, decay lr * wd * param where decayed.

  trust_ratio: LAMB instead (You et al. 2019, algorithm 2): the step with its decay,
  r = m_hat / (sqrt(v_hat) + eps) + wd * param, is scaled per parameter by ||param|| / ||r||
  (1 where either norm is 0).
  """
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  history = []
  for step, g in enumerate(grads, start=1):
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat = m[k] / (1 - b1 ** step)
      v_hat = v[k] / (1 - b2 ** step)
      wd = weight_decay if decayed(k) else 0.0
      r = m_hat / (np.sqrt(v_hat) + eps) + wd * p[k]
      trust = 1.0
      if trust_ratio:
        p_norm, r_norm = np.linalg.norm(p[k]), np.linalg.norm(r)
        trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
      p[k] = p[k] - lr * trust * r
    history.append(dict(p))
  return history


def flat(tree):
  return {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def is_matrix(path):
  return 'kernel' in path or 'embedding' in path


ADAMW = dict(name='adamw', learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.3)


def test_adamw_matches_numpy_and_torch_and_skips_1d_params():
  params, grads = tiny_params(), tiny_grads(3)
  transformation, _ = opt.make_optimizer(ADAMW, total_steps=3, params=params)
  got = [flat(p) for p in run_optax(transformation, params, grads)]
  by_hand = numpy_adamw(flat(params), [flat(g) for g in grads], 0.05, 0.8, 0.95, 1e-6, 0.3,
                        is_matrix)
  torch_kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)
  by_torch = [flat(p) for p in run_torch(
      torch.optim.AdamW, params, grads,
      [(is_matrix, dict(torch_kw, weight_decay=0.3)),
       (lambda p: not is_matrix(p), dict(torch_kw, weight_decay=0.0))])]
  for step in range(3):
    for key in got[step]:
      np.testing.assert_allclose(got[step][key], by_hand[step][key], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got[step][key], by_torch[step][key], rtol=1e-5, atol=1e-6)

  # The biases and the LayerNorm scale are not decayed: they move exactly as with no decay at
  # all, and the matrices do not.
  undecayed, _ = opt.make_optimizer(dict(ADAMW, weight_decay=0.0), total_steps=3)
  plain = flat(run_optax(undecayed, params, grads)[-1])
  for key in ("['dense']['bias']", "['norm']['scale']"):
    np.testing.assert_array_equal(got[-1][key], plain[key])
  for key in ("['dense']['kernel']", "['embedding']"):
    assert np.abs(got[-1][key] - plain[key]).max() > 1e-3


def test_adamw_mask_all_decays_every_param_like_torch():
  params, grads = tiny_params(), tiny_grads(3)
  transformation, _ = opt.make_optimizer(dict(ADAMW, weight_decay_mask='all'), total_steps=3)
  got = flat(run_optax(transformation, params, grads)[-1])
  by_torch = flat(run_torch(torch.optim.AdamW, params, grads, [
      (lambda p: True, dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3))])[-1])
  for key in got:
    np.testing.assert_allclose(got[key], by_torch[key], rtol=1e-5, atol=1e-6)


def test_adam_and_sgd_weight_decay_is_l2_like_torch():
  params, grads = tiny_params(), tiny_grads(3)
  adam, _ = opt.make_optimizer(dict(name='adam', learning_rate=0.05, weight_decay=0.3), 3)
  sgd, _ = opt.make_optimizer(dict(name='sgd', learning_rate=0.05, weight_decay=0.3,
                                   momentum=0.9, nesterov=True), 3)
  for transformation, torch_class, kw in (
      (adam, torch.optim.Adam, dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8)),
      (sgd, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True))):
    got = flat(run_optax(transformation, params, grads)[-1])
    by_torch = flat(run_torch(torch_class, params, grads, [
        (is_matrix, dict(kw, weight_decay=0.3)),
        (lambda p: not is_matrix(p), dict(kw, weight_decay=0.0))])[-1])
    for key in got:
      np.testing.assert_allclose(got[key], by_torch[key], rtol=1e-5, atol=1e-6, err_msg=key)


def numpy_lamb(params, grads, lr, b1, b2, eps, weight_decay, decayed):
  """LAMB by hand in float64 (numpy_adamw with the trust ratio)."""
  return numpy_adamw(params, grads, lr, b1, b2, eps, weight_decay, decayed, trust_ratio=True)


def test_lamb_matches_the_paper_by_hand():
  params, grads = tiny_params(), tiny_grads(3)
  transformation, _ = opt.make_optimizer(dict(ADAMW, name='lamb'), total_steps=3, params=params)
  got = [flat(p) for p in run_optax(transformation, params, grads)]
  by_hand = numpy_lamb(flat(params), [flat(g) for g in grads], 0.05, 0.8, 0.95, 1e-6, 0.3,
                       is_matrix)
  for step in range(3):
    for key in got[step]:
      np.testing.assert_allclose(got[step][key], by_hand[step][key], rtol=1e-5, atol=1e-6,
                                 err_msg=f'{key} at step {step}')


def squared_norm(params):
  return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(params))


def test_lamb_and_adafactor_step_and_adafactor_decay_is_decoupled():
  params = tiny_params()
  grads = [jax.grad(squared_norm)(jax.tree.map(jnp.asarray, params))]
  for name in ('lamb', 'adafactor'):
    transformation, _ = opt.make_optimizer(dict(name=name, learning_rate=0.01), 5,
                                           params=params)
    after = run_optax(transformation, params, grads)[-1]
    assert squared_norm(after) < squared_norm(params), name

  # With zero gradients, adafactor's only change is the decay: param * (1 - lr * wd) on matrices.
  transformation, _ = opt.make_optimizer(dict(name='adafactor', learning_rate=0.1,
                                              weight_decay=0.5), 5)
  zero = [jax.tree.map(np.zeros_like, params)] * 2
  got = flat(run_optax(transformation, params, zero)[-1])
  for key, x in flat(params).items():
    expected = x * (1 - 0.1 * 0.5) ** 2 if is_matrix(key) else x
    np.testing.assert_allclose(got[key], expected, rtol=1e-6, err_msg=key)


def test_global_norm_clipping():
  transformation, _ = opt.make_optimizer(dict(name='sgd', learning_rate=1.0, momentum=0.0,
                                              grad_clip_norm=1.0), total_steps=1)
  params = {'a': np.zeros(2, np.float32), 'b': np.zeros((1, 1), np.float32)}
  big = {'a': np.array([6.0, 0.0], np.float32), 'b': np.array([[8.0]], np.float32)}  # norm 10
  updates, _ = transformation.update(big, transformation.init(params), params)
  np.testing.assert_allclose(updates['a'], [-0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates['b'], [[-0.8]], rtol=1e-6)
  assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-6)
  small = {'a': np.array([0.3, 0.0], np.float32), 'b': np.array([[0.4]], np.float32)}
  updates, _ = transformation.update(small, transformation.init(params), params)
  np.testing.assert_allclose(updates['b'], [[-0.4]], rtol=1e-6)


def test_optimizer_takes_abstract_params_and_checks_them():
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tiny_params())
  transformation, _ = opt.make_optimizer(dict(ADAMW, grad_accum_steps=2), 10, params=abstract)
  state = jax.eval_shape(transformation.init, abstract)
  assert jax.tree.leaves(state)
  with pytest.raises(ValueError, match='nothing would be decayed'):
    opt.make_optimizer(ADAMW, 10, params={'bias': np.zeros(3, np.float32)})
  with pytest.raises(TypeError, match='arrays or jax.ShapeDtypeStruct'):
    opt.make_optimizer(ADAMW, 10, params={'w': [1.0, 2.0]})


def tiny_stack_model(family, scan):
  """A 2-block GPT-2 or BERT, looped or scanned, and its input ids."""
  stack = layers.LayerStack(scan=scan)
  if family == 'gpt2':
    model = gpt2.GPT2(dataclasses.replace(gpt2.PRESETS['gpt2-tiny'], num_layers=2), head='lm',
                      layer_stack=stack)
  else:
    model = bert.Bert(dataclasses.replace(bert.PRESETS['bert-tiny'], num_layers=2),
                      head='pretraining', layer_stack=stack)
  return model, np.arange(3, 11, dtype=np.int32)[None]


def looped_keys(tree):
  """flat(tree) with layer_0 ... layer_{n-1} merged into the scanned layout's 'layers' key."""
  merged = {}
  for key, x in flat(tree).items():
    merged.setdefault(re.sub(r"\['layer_\d+'\]", "['layers']", key), set()).add(x)
  return merged


@pytest.mark.parametrize('family', ['gpt2', 'bert'])
def test_default_decay_mask_ignores_the_scanned_layer_axis(family):
  looped, ids = tiny_stack_model(family, scan=False)
  scanned, _ = tiny_stack_model(family, scan=True)
  params = nn.unbox(looped.init(jax.random.key(0), input_ids=ids))['params']
  # The scanned model's own (abstract) parameters: the mask is read from shapes and paths alone.
  abstract = jax.eval_shape(
      lambda: nn.unbox(scanned.init(jax.random.key(0), input_ids=ids)))['params']
  looped_mask, scanned_mask = flat(opt._decay_mask(params)), flat(opt._decay_mask(abstract))
  assert any("['layers']" in k for k in scanned_mask)
  # Every block decays the same parameters, and the scanned stack decays exactly those.
  merged = looped_keys(opt._decay_mask(params))
  assert all(len(v) == 1 for v in merged.values())
  assert {k: v.pop() for k, v in merged.items()} == scanned_mask
  assert looped_mask == {k: np.ndim(x) >= 2 for k, x in flat(params).items()}

  # Through the optimizer: AdamW with zero gradients only decays. The scanned parameters step
  # to the looped ones restacked; a stacked bias keeps its value, a stacked kernel shrinks.
  stacked = layers.stack_layers(params)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda x: x.shape, abstract)
  config = dict(ADAMW, weight_decay=0.5)
  step = lambda p: run_optax(opt.make_optimizer(config, 3, params=p)[0], p,
                             [jax.tree.map(np.zeros_like, p)])[0]
  got, want = step(stacked), step(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               layers.unstack_layers(got), want)
  got, stacked = flat(got), flat(stacked)
  key = f"['{'transformer' if family == 'gpt2' else 'bert'}']['layers']['attention']['query']"
  bias, kernel = key + "['bias']", key + "['kernel']"
  assert np.shape(stacked[bias]) == (2, 64) and np.ndim(stacked[kernel]) == 3
  assert not scanned_mask[bias] and scanned_mask[kernel]
  np.testing.assert_array_equal(got[bias], stacked[bias])
  np.testing.assert_allclose(got[kernel], stacked[kernel] * (1 - 0.05 * 0.5), rtol=1e-6)


def test_config_errors():
  with pytest.raises(ValueError, match=r"\['lr'\].*known keys.*learning_rate"):
    opt.merged_config({'lr': 0.1})
  with pytest.raises(ValueError, match="name 'adamax' is not one of"):
    opt.make_optimizer({'name': 'adamax'}, 10)
  with pytest.raises(ValueError, match="schedule 'exponential' is not one of"):
    opt.make_schedule({'schedule': 'exponential'}, 10)
  with pytest.raises(ValueError, match=r'warmup_steps \(20\) is more than total_steps \(10\)'):
    opt.make_schedule({'warmup_steps': 20}, 10)
  with pytest.raises(ValueError, match='not after the warmup'):
    opt.make_schedule({'schedule': 'cosine', 'warmup_steps': 10, 'decay_steps': 10}, 100)
  with pytest.raises(ValueError, match='warmup_steps to 0'):
    opt.make_schedule({'schedule': 'slanted_triangular', 'warmup_steps': 5}, 100)
  with pytest.raises(ValueError, match='min_learning_rate'):
    opt.merged_config({'learning_rate': 1e-4, 'min_learning_rate': 1e-3})
  with pytest.raises(ValueError, match='total_steps must be >= 1'):
    opt.make_schedule({}, 0)
  # The defaults are complete: a ConfigDict with every key passes through unchanged.
  assert opt.merged_config(opt.default_config()).to_dict() == opt.default_config().to_dict()


@pytest.mark.parametrize('name', ['adamw', 'sgd', 'adafactor'])
def test_state_shardings_follow_the_parameters_with_or_without_start_steps(name):
  """Moments take their parameter's sharding, counts and factored statistics the default (the
  shapes here tell them apart: adafactor's factored rows and columns match no parameter): the
  same as optax.tree_map_params gives, and, where that cannot trace (start steps' per-group
  states), every parameter-shaped leaf of every group."""
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'))
  sharding = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  params = {'encoder': {'kernel': jnp.ones((256, 384)), 'bias': jnp.ones((128,))},
            'head': {'kernel': jnp.ones((384, 8))}}
  shardings = {'encoder': {'kernel': sharding('data', 'tensor'), 'bias': sharding('tensor')},
               'head': {'kernel': sharding(None, 'data')}}
  replicated = sharding()
  config = {'name': name, 'momentum': 0.9}
  plain, _ = opt.make_optimizer(config, 10)
  want = optax.tree_map_params(
      plain, lambda leaf, p, s: s if leaf.shape == p.shape else replicated,
      jax.eval_shape(plain.init, params), params, shardings,
      transform_non_params=lambda _: replicated)
  got = opt.state_shardings(plain, params, shardings, replicated)
  assert jax.tree.leaves(got) == jax.tree.leaves(want)
  assert jax.tree.structure(got) == jax.tree.structure(want)

  start_steps = {'encoder': {'kernel': 4, 'bias': 4}, 'head': {'kernel': 0}}
  grouped, _ = opt.make_optimizer(config, 10, start_steps=start_steps)
  got = opt.state_shardings(grouped, params, shardings, replicated)
  abstract = jax.eval_shape(grouped.init, params)
  by_shape = {(256, 384): shardings['encoder']['kernel'], (128,): shardings['encoder']['bias'],
              (384, 8): shardings['head']['kernel']}
  mirrored = 0
  for leaf, leaf_sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(got)):
    mirrored += leaf.shape in by_shape
    assert leaf_sharding == by_shape.get(leaf.shape, replicated), leaf.shape
  assert mirrored >= (2 if name == 'adafactor' else 3)
  # One sharding per state leaf (jit would also take a prefix tree), and they fit the state.
  state = jax.jit(grouped.init, out_shardings=got)(params)
  assert jax.tree.structure(got) == jax.tree.structure(state)


def test_betas_and_nesterov_that_cannot_apply_are_config_errors():
  # b1 = 1 divides Adam's bias correction by 1 - 1**t = 0 (NaN from the first step); torch.optim
  # refuses betas outside [0, 1) too.
  for key, value in (('b1', 1.0), ('b2', 1.0), ('b1', -0.1), ('b2', 1.5)):
    with pytest.raises(ValueError, match=rf'config.optimizer.{key} must be in \[0, 1\)'):
      opt.merged_config({key: value})
  # Asked-for Nesterov momentum that the optimizer would silently not apply (torch's SGD raises).
  with pytest.raises(ValueError, match='nesterov.*momentum'):
    opt.make_optimizer({'name': 'sgd', 'momentum': 0.0, 'nesterov': True}, 10)
  for name in ('lamb', 'adafactor'):
    with pytest.raises(ValueError, match=f'nesterov.*{name}'):
      opt.make_optimizer({'name': name, 'nesterov': True}, 10)
  for name in ('sgd', 'adam', 'adamw'):
    opt.make_optimizer({'name': name, 'nesterov': True}, 10)


def test_peak_flops_tell_device_variants_apart():
  """MFU's denominator (ptm_jax.train.hardware; kept here with the other training tests): jax's
  device_kind is 'TPU v5' for a v5p and 'TPU v5 lite' for a v5e, and 'L4' is a substring of the
  L40 and L40S, which a substring lookup must not read as an L4."""
  from ptm_jax.train import hardware
  device = lambda kind: type('Device', (), {'device_kind': kind})()
  for kind, peak in (('TPU v5', 459e12), ('TPU v5p', 459e12), ('TPU v5 lite', 197e12),
                     ('TPU v5e', 197e12), ('TPU v6 lite', 918e12), ('TPU v4', 275e12),
                     ('NVIDIA L4', 121e12), ('NVIDIA L40S', 362.05e12),
                     ('NVIDIA L40', 181.05e12), ('NVIDIA H100 80GB HBM3', 989e12),
                     ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 NVL', 835e12),
                     ('NVIDIA H200', 989e12), ('NVIDIA H200 NVL', 835e12),
                     ('NVIDIA A100-SXM4-80GB', 312e12)):
    assert hardware.peak_flops(device(kind)) == peak, kind
