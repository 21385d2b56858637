"""Layers that change how XLA computes, never what: cotangent_barrier (the identity, its gradient
kept out of XLA CPU's fusions), dense_dot (nn.Dense's product, its kernel gradient in the form
XLA CPU's matmuls take), conv_general_dilated (matmul-shaped convolutions as dots),
tied_logits (the LM head's product, vocabulary-major on CPU) and max_pool (torch's gradient)."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import torch

from ptm_jax.models import layers


@contextlib.contextmanager
def _traced_for_cpu():
  """The CPU forms (`layers.by_platform`), whatever the default backend: the CPU device's mesh
  set. Arrays placed on the CPU device with it run those forms there."""
  with jax.set_mesh(jax.make_mesh((1,), ('x',), axis_types=(AxisType.Auto,),
                                  devices=jax.devices('cpu')[:1])):
    yield


def test_by_platform_traces_only_the_branch_of_the_platform_it_runs_on():
  traced = []

  def f(x):
    return layers.by_platform(x, cpu=lambda x: traced.append('cpu') or x + 1,
                              default=lambda x: traced.append('default') or x + 2)

  jaxpr = str(jax.make_jaxpr(f)(1.0))
  assert traced == ['cpu' if jax.default_backend() == 'cpu' else 'default']
  assert 'platform_index' not in jaxpr and 'cond' not in jaxpr, jaxpr
  traced.clear()
  with _traced_for_cpu():  # the mesh's platform decides
    assert layers.traced_platform() == 'cpu'
    assert float(jax.jit(f)(jax.device_put(1.0, jax.devices('cpu')[0]))) == 2.0
  assert traced == ['cpu']
  traced.clear()
  tpu = jax.sharding.AbstractMesh(
      (1,), ('x',), abstract_device=jax.sharding.AbstractDevice('TPU v5p', None, 'tpu'))
  with jax.sharding.use_abstract_mesh(tpu):
    jax.make_jaxpr(f)(1.0)
  assert traced == ['default']


def _loss(x, w):
  return jnp.sum(jnp.tanh(layers.cotangent_barrier(x) * w))


def test_value_and_gradients_are_the_identitys():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  w = rng.normal(size=(6,)).astype(np.float32)
  np.testing.assert_array_equal(jax.jit(layers.cotangent_barrier)(x), x)
  plain = jax.grad(lambda x, w: jnp.sum(jnp.tanh(x * w)), argnums=(0, 1))(x, w)
  barred = jax.jit(jax.grad(_loss, argnums=(0, 1)))(x, w)
  for got, want in zip(barred, plain):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # Forward mode goes through the same rule.
  _, tangent = jax.jvp(layers.cotangent_barrier, (x,), (w * np.ones_like(x),))
  np.testing.assert_array_equal(tangent, w * np.ones_like(x))
  # Integer inputs pass through (no tangent to guard).
  ints = jnp.arange(5)
  np.testing.assert_array_equal(layers.cotangent_barrier(ints), ints)


def test_the_conditional_survives_compilation_on_cpu():
  x, w = jax.device_put((jnp.ones((4, 6)), jnp.ones((6,))), jax.devices('cpu')[0])
  with _traced_for_cpu():
    hlo = jax.jit(jax.grad(_loss)).lower(x, w).compile().as_text()
  assert 'conditional' in hlo, 'XLA folded the barrier away: the CPU fusions are unguarded'


def test_its_predicate_needs_no_other_device():
  """Under a batch-sharded step, the barrier adds no cross-device traffic.

  A predicate read from the input (its first element, say) would be a value on one device that
  every other device waits for in every step.
  """
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  x = jax.device_put(np.ones((16, 6), np.float32), NamedSharding(mesh, PartitionSpec('data')))
  w = jax.device_put(np.ones((6,), np.float32), NamedSharding(mesh, PartitionSpec()))
  grad_x = jax.jit(jax.grad(_loss))
  hlo = grad_x.lower(x, w).compile().as_text()
  assert 'conditional' in hlo
  for collective in ('all-reduce', 'all-gather', 'collective-permute', 'all-to-all'):
    assert collective not in hlo, f'the barrier added a {collective}'
  np.testing.assert_allclose(grad_x(x, w), 1 - np.tanh(1.0)**2, rtol=1e-6)


@pytest.mark.parametrize('x_shape, features, dtype', [
    ((2, 5, 4), 6, jnp.float32),      # widening (D <= F): dot(x, g) over the leading axes
    ((2, 5, 6), 4, jnp.float32),      # narrowing: JAX's form
    ((7, 3), 3, jnp.float32),         # 2-D input, square kernel
    ((2, 2, 3, 4), 5, jnp.float32),   # two leading axes to contract
    ((2, 5, 4), 6, jnp.bfloat16),     # mixed precision: the gradients keep the operands' dtype
])
def test_dense_dot_and_its_gradients_equal_lax(x_shape, features, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), dtype)
  kernel = jnp.asarray(rng.normal(size=(x_shape[-1], features)), dtype)
  lax_dot = lambda x, k: jax.lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())))
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k).astype(jnp.float32)))
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(layers.dense_dot(x, kernel), np.float32),
                             np.asarray(lax_dot(x, kernel), np.float32), rtol=tol, atol=tol)
  got = jax.jit(jax.grad(loss(layers.dense_dot), (0, 1)))(x, kernel)
  want = jax.grad(loss(lax_dot), (0, 1))(x, kernel)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype == dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol)


def test_dense_kernel_gradient_needs_no_transposed_output_gradient_on_cpu():
  """The reason dense_dot exists: JAX's own rule has XLA CPU copy g (B*T x F) transposed.
  Compiled for the CPU device, which every JAX install has, whatever the default backend."""
  cpu = jax.devices('cpu')[0]
  x = jax.device_put(jnp.ones((2, 5, 4)), cpu)  # g is (2, 5, 6): (F, B*T) = (6, 10)
  kernel = jax.device_put(jnp.ones((4, 6)), cpu)
  transposed_g = re.compile(r'f32\[6,10\]\{1,0\} (fusion|copy|transpose)\(')

  def hlo(product):
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(product(x, k))), (0, 1)))
    with _traced_for_cpu():
      return grad.lower(x, kernel).compile().as_text()

  # The premise (if XLA stops doing this, dense_dot's custom rule is no longer needed) ...
  assert transposed_g.search(hlo(lambda x, k: jnp.einsum('btd,df->btf', x, k)))
  # ... and the fix.
  assert not transposed_g.search(hlo(layers.dense_dot))


def test_dense_layers_take_dense_dot_and_plain_autodiff_gives_forward_mode():
  block = layers.TransformerBlock(2, 4, 16, 'gelu_new', 1e-5, norm_first=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8)), jnp.float32)
  params = block.init(jax.random.key(0), x)
  tangent = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  apply = lambda p: jnp.sum(jnp.sin(block.apply(p, x)))
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(apply, (params,), (tangent,))  # dense_dot: reverse mode only
  with layers.plain_dense_autodiff():
    value, directional = jax.jvp(apply, (params,), (tangent,))
  # Forward mode agrees with reverse mode through dense_dot: <grad, tangent>.
  grads = jax.grad(apply)(params)
  want = sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(tangent)))
  np.testing.assert_allclose(value, apply(params), rtol=1e-6)
  np.testing.assert_allclose(directional, want, rtol=1e-5)


def test_dots_remat_policies_keep_dense_products():
  """dense_dot's custom_vjp hides its dot_general from jax.checkpoint_policies.checkpoint_dots;
  'dots' must still keep the products (no forward dot recomputed), 'full' recompute them."""
  x, w1, w2 = jnp.ones((8, 16, 8)), jnp.ones((8, 32)), jnp.ones((32, 8))
  dense = lambda x, w: layers._dense_dot_general(x, w, (((2,), (0,)), ((), ())))

  def dots_in_step(policy):
    body = lambda x: jnp.sin(dense(jnp.tanh(dense(x, w1)), w2))
    block = body if policy == 'none' else jax.checkpoint(body, policy=layers.REMAT_POLICIES[policy])
    step = jax.jit(jax.value_and_grad(lambda x: jnp.sum(block(block(x)))))
    return step.lower(x).compile().as_text().count(' dot(')

  kept = dots_in_step('none')
  assert dots_in_step('dots') == dots_in_step('dots_no_batch') == kept
  assert dots_in_step('full') > kept


@pytest.mark.parametrize('t, padded, causal, dtype', [
    (256, False, True, jnp.float32),    # 4 blocks of 64 queries
    (130, True, True, jnp.float32),     # 64 + 64 + 2, with padded keys
    (64, False, True, jnp.float32),     # one block: the whole, causal mask
    (197, True, False, jnp.float32),    # ViT / BERT: bidirectional, padded keys
    (130, True, True, jnp.bfloat16),
])
def test_cpu_attention_equals_jaxs(t, padded, causal, dtype):
  """layers.dot_product_attention (head-major on CPU, causal by query blocks) against
  jax.nn.dot_product_attention, values and gradients."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, t, 3, 8)), dtype) for _ in range(3))
  mask = None
  if padded:
    keep = np.ones((2, t), bool)
    keep[1, -7:] = False
    mask = layers.padding_mask(jnp.asarray(keep))
  whole = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
  ours = lambda q, k, v: layers.dot_product_attention(q, k, v, mask, causal=causal)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v).astype(jnp.float32)))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  as32 = lambda a: np.asarray(a, np.float32)
  q, k, v = jax.device_put((q, k, v), jax.devices('cpu')[0])  # the CPU forms on any backend
  with _traced_for_cpu():
    got_out = jax.jit(ours)(q, k, v)
    got_grads = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(as32(got_out), as32(whole(q, k, v)), rtol=tol, atol=tol)
  for got, want in zip(got_grads, jax.grad(loss(whole), (0, 1, 2))(q, k, v)):
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(as32(got), as32(want), rtol=tol, atol=tol)
  # On the CPU device, blocked: no query row meets the full t x t logits (below 2 blocks' worth
  # it is whole).
  with _traced_for_cpu():
    hlo = jax.jit(ours).lower(q, k, v).compile().as_text()
  blocked = causal and t >= 2 * layers.CAUSAL_QUERY_BLOCK
  assert (f'{t},{t}]' in hlo) != blocked, t

NHWC = ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize('image, kernel, stride, padding, as_dot', [
    (9, 1, 1, ((0, 0), (0, 0)), True),      # ResNet's 1x1 convolutions
    (9, 1, 2, ((0, 0), (0, 0)), True),      # ... and its strided shortcut projections
    (8, 4, 4, 'VALID', True),               # patch embedding
    (10, 4, 4, 'VALID', True),              # ... dropping the partial patches, as VALID does
    (9, 3, 1, ((1, 1), (1, 1)), False),     # an overlapping window: left to lax
    (9, 1, 1, ((1, 1), (1, 1)), False),     # padded: left to lax
    (8, 2, 1, 'VALID', False),
])
def test_conv_as_dot_equals_lax_with_its_gradients(image, kernel, stride, padding, as_dot):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, image, image, 5)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, 5, 7)).astype(np.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)  # as nn.Conv passes them

  def loss(conv, x, w):
    y = conv(x, w, (stride, stride), padding, dimension_numbers=dn)
    return jnp.sum(jnp.sin(y)), y

  with jax.default_matmul_precision('highest'):
    (_, want), want_grads = jax.value_and_grad(
        lambda x, w: loss(jax.lax.conv_general_dilated, x, w), (0, 1), has_aux=True)(x, w)
    ours = jax.jit(jax.value_and_grad(lambda x, w: loss(layers.conv_general_dilated, x, w),
                                      (0, 1), has_aux=True))
    (_, got), got_grads = ours(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, h in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)
  hlo = ours.lower(x, w).compile().as_text()
  assert ('convolution' not in hlo) == as_dot, hlo


def test_conv_as_dot_keeps_grouped_and_dilated_convolutions_on_lax():
  x = jnp.ones((1, 6, 6, 4))
  w = jnp.ones((1, 1, 2, 4))
  grouped = layers.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=NHWC,
                                        feature_group_count=2)
  np.testing.assert_array_equal(grouped, jax.lax.conv_general_dilated(
      x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=NHWC, feature_group_count=2))
  # lax's default layout (NCHW, OIHW); read as NHWC, this 1x1 kernel would pass as a dot.
  nchw = jnp.asarray(np.random.default_rng(1).normal(size=(1, 1, 6, 6)), jnp.float32)
  oihw = jnp.ones((1, 1, 6, 6))
  out = layers.conv_general_dilated(nchw, oihw, (1, 1), 'VALID')  # lax's default NCHW layout
  np.testing.assert_array_equal(out, jax.lax.conv_general_dilated(nchw, oihw, (1, 1), 'VALID'))


def test_tied_logits_equal_the_einsum_and_take_the_vocabulary_major_dot_on_cpu():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
  einsum = lambda x, t: jnp.einsum('btd,vd->btv', x, t)
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(layers.tied_logits(x, table), einsum(x, table), rtol=1e-6,
                               atol=1e-6)
    loss = lambda f: lambda x, t: jnp.sum(jnp.sin(f(x, t)))
    for got, want in zip(jax.grad(loss(layers.tied_logits), (0, 1))(x, table),
                         jax.grad(loss(einsum), (0, 1))(x, table)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with _traced_for_cpu():
    hlo = jax.jit(layers.tied_logits).lower(
        *jax.device_put((x, table), jax.devices('cpu')[0])).compile().as_text()
  assert re.search(r'f32\[50,6\]\{1,0\} dot\(', hlo), 'the dot is not vocabulary-major'


@pytest.mark.parametrize('multiple', [1, 8, 64])
def test_padded_vocabulary_logits_equal_the_einsum_values_and_gradients(multiple):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(13, 8)), jnp.float32)  # 13: padded to 16 or 64
  einsum = lambda x, t: jnp.einsum('btd,vd->btv', x, t)
  padded = lambda x, t: layers.padded_vocabulary_logits(x, t, multiple)
  with jax.default_matmul_precision('highest'):
    assert padded(x, table).shape == (2, 3, 13)
    np.testing.assert_allclose(padded(x, table), einsum(x, table), rtol=1e-6, atol=1e-6)
    loss = lambda f: lambda x, t: jnp.sum(jnp.sin(f(x, t)))
    got = jax.grad(loss(padded), (0, 1))(x, table)
    want = jax.grad(loss(einsum), (0, 1))(x, table)
    assert got[1].shape == table.shape
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  hlo = jax.jit(padded).lower(x, table).as_text()
  if multiple > 1:
    assert f'tensor<{-13 % multiple + 13}x8xf32>' in hlo, 'the table was not padded'
  else:
    assert 'pad' not in hlo


def test_padded_vocabulary_logits_with_the_table_sharded_over_the_vocabulary():
  # The GPU/TPU head under tensor parallelism: the table's vocabulary axis on 'tensor' (as the
  # logical rules put it), padded from 24 to 64 rows across the shards.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 3, 8)).astype(np.float32)
  table = rng.normal(size=(24, 8)).astype(np.float32)
  mesh = jax.make_mesh((2, 4), ('data', 'tensor'), axis_types=(AxisType.Explicit,) * 2)
  x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec('data')))
  table_sharded = jax.device_put(table, NamedSharding(mesh, PartitionSpec('tensor')))
  padded = jax.jit(lambda x, t: layers.padded_vocabulary_logits(x, t, 64))
  grad = jax.jit(jax.grad(lambda x, t: jnp.sum(jnp.sin(layers.padded_vocabulary_logits(x, t, 64))),
                          (0, 1)))
  with jax.default_matmul_precision('highest'), jax.set_mesh(mesh):
    got = padded(x_sharded, table_sharded)
    got_grads = grad(x_sharded, table_sharded)
  want = np.einsum('btd,vd->btv', x, table)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  want_dlogits = np.cos(want)
  np.testing.assert_allclose(got_grads[0], np.einsum('btv,vd->btd', want_dlogits, table),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got_grads[1], np.einsum('btv,btd->vd', want_dlogits, x),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape, window, strides, padding', [
    ((2, 9, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),   # ResNet's stem pool, odd sizes
    ((1, 7, 7, 2), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((2, 10, 11, 3), (3, 2), (1, 2), ((1, 1), (0, 0))),
])
def test_max_pool_equals_torch_forward_and_backward_ties_included(shape, window, strides,
                                                                   padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  x[0, :4, :4, 0] = 1.5      # equal maxima within and across windows
  x = np.maximum(x, 0)       # and the ReLU's zeros, as ResNet's stem feeds its pool
  y, vjp = jax.vjp(lambda x: layers.max_pool(x, window, strides, padding), jnp.asarray(x))
  dy = rng.normal(size=y.shape).astype(np.float32)
  (dx,) = vjp(jnp.asarray(dy))
  x_torch = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  y_torch = torch.nn.functional.max_pool2d(x_torch, window, strides,
                                           (padding[0][0], padding[1][0]))
  y_torch.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
  np.testing.assert_array_equal(y, y_torch.detach().numpy().transpose(0, 2, 3, 1))
  # Where windows overlap, an element's gradient is a sum: equal up to its order.
  np.testing.assert_allclose(dx, x_torch.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6,
                             atol=1e-6)
  assert float(jnp.abs(dx).sum()) > 0


@pytest.mark.parametrize('causal', [True, False])
def test_attention_dropout_keeps_the_masks_and_averages_to_the_exact_attention(causal):
  """MultiHeadAttention's explicit-probabilities path, taken while attention dropout is active:
  with nothing dropped it equals the fused path; whatever it drops, neither later positions
  (causal) nor padded keys reach an output; over many dropout keys it averages to the
  deterministic output (inverted dropout is unbiased)."""
  rng = np.random.default_rng(0)
  b, t, d = 2, 6, 8
  x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  keep = np.ones((b, t), bool)
  keep[1, -2:] = False
  mask = layers.padding_mask(jnp.asarray(keep))
  # Weights of std 0.5 (not 0.02) give logits and outputs of order one.
  module = lambda rate: layers.MultiHeadAttention(num_heads=2, head_dim=4, attention_dropout=rate,
                                                  init_std=0.5)
  params = module(0.5).init(jax.random.key(0), x, mask, causal=causal)
  exact = module(0.5).apply(params, x, mask, causal=causal)
  dropped = lambda rate, x, key: module(rate).apply(
      params, x, mask, causal=causal, deterministic=False, rngs={'dropout': key})

  np.testing.assert_allclose(dropped(1e-9, x, jax.random.key(1)), exact, rtol=1e-5, atol=1e-6)

  key = jax.random.key(2)
  once = dropped(0.5, x, key)
  scale = float(jnp.abs(exact).max())
  assert scale > 0.3
  assert float(jnp.abs(once - exact).max()) > 0.1 * scale, 'nothing was dropped'
  # Change the inputs at the padded positions (and, causal, at positions 3 on): the outputs of
  # the other queries stay exactly what they were under the same dropout key.
  changed = x.at[1, -2:].add(5.0)
  unchanged_queries = [(0, slice(None)), (1, slice(0, t - 2))]
  if causal:
    changed = changed.at[:, 3:].add(3.0)
    unchanged_queries = [(0, slice(0, 3)), (1, slice(0, 3))]
  again = dropped(0.5, changed, key)
  for row, queries in unchanged_queries:
    np.testing.assert_array_equal(again[row, queries], once[row, queries])
  assert float(jnp.abs(again - once).max()) > 0.1 * scale  # the changed positions' own outputs move

  n = 4000
  samples = jax.vmap(lambda k: dropped(0.5, x, k))(jax.random.split(jax.random.key(3), n))
  standard_error = samples.std(0) / np.sqrt(n)
  assert float(standard_error.min()) > 0
  np.testing.assert_array_less(np.abs(samples.mean(0) - exact), 5 * standard_error + 1e-6)
