"""LoRA, DoRA and QLoRA (ptm_jax.adapt.lora) on the real model families: exact at init, merge."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptm_jax.adapt import config as adapt_config
from ptm_jax.adapt import lora, nf4, rules
from ptm_jax.models import bert, gpt2, layers, resnet, vit

TINY = {
    'gpt2': lambda: gpt2.GPT2(dataclasses.replace(
        gpt2.PRESETS['gpt2-small'], num_layers=2, hidden_size=64, num_heads=2, vocab_size=50,
        max_position_embeddings=16, dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0),
        head='lm'),
    'bert': lambda: bert.Bert(dataclasses.replace(
        bert.PRESETS['bert-tiny'], vocab_size=60, num_labels=3), head='sequence_classification'),
    'vit': lambda: vit.ViT(dataclasses.replace(
        vit.PRESETS['vit-ti/16'], image_size=16, patch_size=4, num_layers=2, hidden_size=64,
        num_heads=2, intermediate_size=128, num_labels=5), head='classification'),
}


def _inputs(family):
  if family == 'vit':
    return {'pixel_values': jax.random.normal(jax.random.key(1), (2, 16, 16, 3))}
  vocab = 50 if family == 'gpt2' else 60
  return {'input_ids': jax.random.randint(jax.random.key(1), (2, 8), 0, vocab)}


def _output(out):
  return out.logits


def _adapted(module, spec, inputs):
  """(base params, adapted params with the base weights grafted in, as after loading)."""
  base = nn.unbox(module.init(jax.random.key(0), **inputs))['params']
  with lora.applied(spec):
    fresh = nn.unbox(module.init(jax.random.key(7), **inputs))['params']
  grafted = rules.unflatten({**rules.flatten(fresh), **rules.flatten(base)})
  return base, lora.prepare(grafted, spec)


def _randomise_b(params, seed=0):
  """Non-zero lora_b everywhere, so that the branch really contributes."""
  flat = rules.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  for key, path in zip(keys, sorted(flat)):
    if path.endswith('lora_b'):
      flat[path] = 0.1 * jax.random.normal(key, flat[path].shape)
  return rules.unflatten(flat)


def _apply(module, params, inputs, spec=None):
  with lora.applied(spec):
    return _output(module.apply({'params': params}, **inputs))


@pytest.mark.parametrize('family', sorted(TINY))
@pytest.mark.parametrize('method', ['lora', 'dora'])
def test_at_init_nothing_changes_and_merged_equals_unmerged(family, method):
  module, inputs = TINY[family](), _inputs(family)
  spec = lora.LowRank(method=method, rank=4, alpha=8.0)
  base, adapted = _adapted(module, spec, inputs)
  reference = _apply(module, base, inputs)
  # B = 0 at init: the adapted model computes exactly the base model.
  np.testing.assert_array_equal(_apply(module, adapted, inputs, spec), reference)

  trained = _randomise_b(adapted)
  unmerged = _apply(module, trained, inputs, spec)
  assert float(jnp.abs(unmerged - reference).max()) > 1e-3  # the branch is really there
  merged_params = lora.merge(trained, spec)
  assert not any('lora' in p or 'dora' in p for p in rules.flatten(merged_params))
  np.testing.assert_allclose(_apply(module, merged_params, inputs), unmerged, atol=2e-5)
  if method == 'lora':
    back = lora.unmerge(merged_params, trained, spec)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), back, trained)


def test_targets_and_shapes_follow_the_regex():
  module, inputs = TINY['bert'](), _inputs('bert')
  spec = lora.LowRank(rank=3, targets=r'attention/(query|value)$')
  _, adapted = _adapted(module, spec, inputs)
  flat = rules.flatten(adapted)
  adapted_modules = sorted(p[:-len('/lora_a')] for p in flat if p.endswith('/lora_a'))
  assert adapted_modules == [f'bert/layer_{i}/attention/{n}' for i in range(2)
                             for n in ('query', 'value')]
  d = flat['bert/layer_0/attention/query/kernel'].shape
  assert flat['bert/layer_0/attention/query/lora_a'].shape == (d[0], 3)
  assert flat['bert/layer_0/attention/query/lora_b'].shape == (3, d[1])


def test_a_is_pytorch_kaiming_uniform_and_b_is_zero():
  """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PEFT's kaiming_uniform(a=sqrt(5)); B = 0."""
  fan_in, rank = 512, 64
  module = nn.Dense(8, name='query')
  spec = lora.LowRank(rank=rank, targets='.')
  with lora.applied(spec):
    params = module.init(jax.random.key(0), jnp.ones((1, fan_in)))['params']
  a = np.asarray(params['lora_a'])
  bound = 1 / np.sqrt(fan_in)
  assert a.shape == (fan_in, rank) and np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.99 * bound                  # uniform over the whole interval
  np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.03)
  assert not np.asarray(params['lora_b']).any()


def test_scale_is_alpha_over_r_or_sqrt_r():
  assert lora.LowRank(rank=16, alpha=32).scale == 2.0
  assert lora.LowRank(rank=16, alpha=32, rslora=True).scale == 8.0


@pytest.mark.parametrize('method, rslora', [('lora', False), ('lora', True), ('dora', False)])
def test_a_dense_branch_computes_the_formula(method, rslora):
  """One nn.Dense with random A, B (and m) against the formula in numpy. LoRA:
  y = x W0 + b + s x A B, s = alpha / r (rsLoRA: alpha / sqrt(r)); DoRA:
  y = m / ||W0 + s A B||_c * (x W0 + s x A B) + b. (Merge = unmerged elsewhere cannot see a
  scale or norm that forward and merge get wrong alike.)"""
  rank, alpha = 4, 6.0
  spec = lora.LowRank(method=method, rank=rank, alpha=alpha, rslora=rslora, targets='.')
  s = alpha / (np.sqrt(rank) if rslora else rank)
  dense = nn.Dense(5, name='q')
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 7)).astype(np.float32)
  with lora.applied(spec):
    shapes = jax.eval_shape(dense.init, jax.random.key(0), x)['params']
    p = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in shapes.items()}
    got = dense.apply({'params': p}, x)
  w = p['kernel'] + s * p['lora_a'] @ p['lora_b']
  if method == 'lora':
    want = x @ w + p['bias']
  else:
    want = p['dora_magnitude'] / np.linalg.norm(w, axis=0) * (x @ w) + p['bias']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lora_dropout_drops_the_branch_input_only():
  """y = x W0 + b + s B A dropout(x): with A = I and B = [I 0], the first outputs minus the
  undropped base are s * dropout(x), each entry 0 or x / (1 - rate)."""
  spec = lora.LowRank(rank=4, alpha=8.0, dropout=0.5, targets='.')
  dense = nn.Dense(6, name='q')
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 4)).astype(np.float32)
  p = {'kernel': rng.normal(size=(4, 6)).astype(np.float32),
       'bias': rng.normal(size=(6,)).astype(np.float32),
       'lora_a': np.eye(4, dtype=np.float32), 'lora_b': np.eye(4, 6, dtype=np.float32)}
  with lora.applied(spec, deterministic=False):
    got = np.asarray(dense.apply({'params': p}, x, rngs={'dropout': jax.random.key(2)}))
  base = x @ p['kernel'] + p['bias']
  np.testing.assert_allclose(got[:, 4:], base[:, 4:], rtol=1e-6, atol=1e-6)
  dropped_x = (got[:, :4] - base[:, :4]) / spec.scale
  kept = np.abs(dropped_x) > 1e-3 * np.abs(x)
  np.testing.assert_allclose(dropped_x[kept], 2 * x[kept], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dropped_x[~kept], 0, atol=1e-5)
  assert 0.35 < kept.mean() < 0.65  # about half kept
  with lora.applied(spec):  # deterministic (evaluation): no dropout
    np.testing.assert_allclose(dense.apply({'params': p}, x)[:, :4] - base[:, :4],
                               spec.scale * x, rtol=1e-5, atol=1e-5)


def test_the_full_weight_delta_is_never_formed():
  """x @ A @ B: no (in, out) array is computed from A and B in the LoRA forward pass."""
  d_in, d_out, rank = 96, 80, 4
  module = nn.Dense(d_out, name='fc')
  spec = lora.LowRank(rank=rank, targets='.')
  x = jnp.ones((3, d_in))
  with lora.applied(spec):
    params = module.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda p: module.apply(p, x))(params)
  dot_shapes = [tuple(e.outvars[0].aval.shape) for e in jaxpr.jaxpr.eqns
                if e.primitive.name == 'dot_general']
  assert (3, rank) in dot_shapes and (d_in, d_out) not in dot_shapes


def test_dora_magnitude_starts_at_the_column_norm_and_norm_is_a_constant():
  module, inputs = TINY['gpt2'](), _inputs('gpt2')
  spec = lora.LowRank(method='dora', rank=4, alpha=8.0)
  _, adapted = _adapted(module, spec, inputs)
  flat = rules.flatten(adapted)
  path = 'transformer/layer_1/mlp/fc_in'
  np.testing.assert_allclose(flat[f'{path}/dora_magnitude'],
                             np.linalg.norm(np.asarray(flat[f'{path}/kernel']), axis=0),
                             rtol=1e-6)
  # With the norm a constant, d out / d m at init is (W0 x) / ||W0||_c: check for one Dense.
  dense = nn.Dense(5, use_bias=False, name='q')
  x = jax.random.normal(jax.random.key(2), (4, 6))
  one = lora.LowRank(method='dora', rank=2, targets='.')
  with lora.applied(one):
    p = nn.unbox(dense.init(jax.random.key(3), x))['params']
    p['lora_b'] = jax.random.normal(jax.random.key(4), p['lora_b'].shape)
    grad_m = jax.grad(lambda m: dense.apply({'params': dict(p, dora_magnitude=m)}, x).sum())(
        p['dora_magnitude'])
  w = p['kernel'] + one.scale * p['lora_a'] @ p['lora_b']
  expected = (x @ w).sum(0) / np.linalg.norm(w, axis=0)
  np.testing.assert_allclose(grad_m, expected, rtol=1e-5)


@pytest.mark.parametrize('block_size', [64, 128, 32])
def test_qlora_stores_nf4_and_computes_with_the_dequantised_kernel(block_size):
  module, inputs = TINY['gpt2'](), _inputs('gpt2')
  spec = lora.LowRank(method='qlora', rank=4, alpha=8.0, compute_dtype='float32',
                      block_size=block_size)
  base, adapted = _adapted(module, spec, inputs)
  flat = rules.flatten(adapted)
  path = 'transformer/layer_0/attention/query'
  assert f'{path}/kernel' not in flat and flat[f'{path}/nf4_codes'].dtype == jnp.uint8
  kernel_bytes = sum(v.nbytes for k, v in flat.items() if k.startswith(f'{path}/nf4_'))
  assert kernel_bytes < 0.15 * rules.flatten(base)[f'{path}/kernel'].nbytes  # ~4.1 of 32 bits
  # The same model with every adapted kernel replaced by its dequantised NF4 value.
  dequantised = rules.flatten(base)
  for module_path in {p.rsplit('/', 1)[0] for p in flat if p.endswith('/nf4_codes')}:
    q = {k.rsplit('/nf4_', 1)[1]: v for k, v in flat.items()
         if k.startswith(f'{module_path}/nf4_')}
    shape = dequantised[f'{module_path}/kernel'].shape
    assert len(q['absmax_codes']) == -(-math.prod(shape) // block_size)  # a scale a block
    dequantised[f'{module_path}/kernel'] = nf4.dequantize(q, shape, jnp.float32,
                                                          block_size=block_size)
  expected = _apply(module, rules.unflatten(dequantised), inputs)
  np.testing.assert_allclose(_apply(module, adapted, inputs, spec), expected, atol=1e-5)
  # ... and that differs from the float32 base by the quantisation error only.
  diff = float(jnp.abs(expected - _apply(module, base, inputs)).max())
  assert 0 < diff < 0.5
  merged = lora.merge(_randomise_b(adapted), spec)
  np.testing.assert_allclose(_apply(module, merged, inputs),
                             _apply(module, _randomise_b(adapted), inputs, spec), atol=2e-5)


class _OddDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='proj')(x)  # a (5, 3) kernel: 15 elements, odd


def test_parameter_report_counts_an_nf4_kernel_as_the_kernel_it_replaced():
  """15 elements pack into 8 NF4 bytes; the report still counts 15 (not 16)."""
  module, inputs = _OddDense(), {'x': jnp.ones((2, 5))}
  spec = lora.LowRank(method='qlora', rank=2, alpha=4.0, targets='proj$',
                      compute_dtype='float32')
  base, adapted = _adapted(module, spec, inputs)
  assert rules.flatten(adapted)['proj/nf4_codes'].shape == (8,)
  flat = rules.flatten(adapted)
  rates = {p: (1.0 if 'lora_' in p else 0.0) for p in flat}
  report = rules.report(rates, adapted)
  lora_params = 5 * 2 + 2 * 3
  assert report['total_params'] == rules.count(base) + lora_params
  assert report['trainable_params'] == lora_params


def test_conv_and_embedding_lora():
  """A ResNet's convolutions and BERT's word embeddings: exact at init, merged = unmerged."""
  net = resnet.ResNet(dataclasses.replace(resnet.PRESETS['resnet18'], num_labels=3,
                                          hidden_sizes=(8, 8, 8, 8), embedding_size=8),
                      head='classification')
  pixels = {'pixel_values': jax.random.normal(jax.random.key(1), (2, 32, 32, 3))}
  cases = [(net, pixels, r'(stem|stage_1_block_0/conv_0)/conv$'),
           (TINY['bert'](), _inputs('bert'), r'word_embeddings$|attention/key$')]
  for module, inputs, targets in cases:
    spec = lora.LowRank(rank=2, alpha=4.0, targets=targets)
    variables = nn.unbox(module.init(jax.random.key(0), **inputs))
    with lora.applied(spec):
      fresh = nn.unbox(module.init(jax.random.key(5), **inputs))
    params = rules.unflatten({**rules.flatten(fresh['params']),
                              **rules.flatten(variables['params'])})
    run = lambda p, s=None: _run(module, dict(variables, params=p), inputs, s)
    np.testing.assert_array_equal(run(params, spec), run(variables['params']))
    trained = _randomise_b(params)
    flat = rules.flatten(trained)
    for path in flat:  # embedding LoRA starts with A = 0: give it a non-zero A too
      if path.endswith('embeddings/lora_a'):
        flat[path] = 0.1 * jax.random.normal(jax.random.key(9), flat[path].shape)
    trained = rules.unflatten(flat)
    out = run(trained, spec)
    assert float(jnp.abs(out - run(variables['params'])).max()) > 1e-3
    np.testing.assert_allclose(run(lora.merge(trained, spec)), out, atol=3e-5)


def _run(module, variables, inputs, spec=None):
  with lora.applied(spec):
    return _output(module.apply(variables, **inputs))


def test_scanned_stack_stacks_the_branches():
  module = TINY['gpt2']().clone(layer_stack=layers.LayerStack(scan=True))
  inputs = _inputs('gpt2')
  spec = lora.LowRank(rank=4)
  base, adapted = _adapted(module, spec, inputs)
  flat = rules.flatten(adapted)
  assert flat['transformer/layers/attention/query/lora_a'].shape == (2, 64, 4)
  np.testing.assert_array_equal(_apply(module, adapted, inputs, spec),
                                _apply(module, base, inputs))
  trained = _randomise_b(adapted)
  np.testing.assert_allclose(_apply(module, lora.merge(trained, spec), inputs),
                             _apply(module, trained, inputs, spec), atol=2e-5)


def test_targets_that_match_no_layer_fail_clearly():
  """A regex that adapts nothing (PEFT's module names, say) would train the head alone."""
  module, inputs = TINY['bert'](), _inputs('bert')
  spec = lora.LowRank(rank=2, targets=r'q_proj$')
  with pytest.raises(ValueError, match=r"lora\.targets 'q_proj\$' matches no .*"
                                       r"bert/layer_0/attention/query"):
    _adapted(module, spec, inputs)


def test_bad_qlora_settings_fail_clearly():
  with pytest.raises(ValueError, match=r"qlora\.compute_dtype must be one of .*'bf16'"):
    lora.LowRank(method='qlora', compute_dtype='bf16')
  # The trainer reads it through the config first (it becomes config.model.dtype).
  with pytest.raises(ValueError, match=r"qlora\.compute_dtype must be one of .*'bf16'"):
    adapt_config.merged_config({'method': 'qlora', 'qlora': {'compute_dtype': 'bf16'}})
  # A block size of 0 divided by zero inside the quantiser.
  with pytest.raises(ValueError, match=r'qlora\.block_size must be a whole number >= 1'):
    adapt_config.merged_config({'method': 'qlora', 'qlora': {'block_size': 0}})
