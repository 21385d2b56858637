"""layers.cotangent_barrier: the identity and its gradient, kept out of XLA CPU's fusions."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

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
