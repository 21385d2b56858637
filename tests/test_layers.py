"""Layers that change how XLA computes, never what: cotangent_barrier (the identity, its gradient
kept out of XLA CPU's fusions), conv_general_dilated (matmul-shaped convolutions as dots),
tied_logits (the LM head's product, vocabulary-major on CPU) and max_pool (torch's gradient)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import torch

from ptm_jax.models import layers


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
  x = jnp.ones((4, 6))
  w = jnp.ones((6,))
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
  if jax.default_backend() == 'cpu':
    hlo = jax.jit(layers.tied_logits).lower(x, table).compile().as_text()
    assert re.search(r'f32\[50,6\]\{1,0\} dot\(', hlo), 'the dot is not vocabulary-major'


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
