"""NF4: the published levels, exact round trips, the per-element error bound and nearest-level
choice (checked in numpy float64, independently of the module), storage cost, jit and sharding,
zero blocks, output dtypes, and the MSE advantage over uniform 4-bit on gaussian weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ptm_jax.adapt import nf4

# Copied from the bitsandbytes / QLoRA publication (REFERENCE.md), not from the module.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
LEVELS64 = np.array(PUBLISHED_NF4, np.float64)
ODD_SHAPE = (301, 129)  # 38829 elements: 607 blocks (last one partial), 3 absmax blocks

# Jitted once here: most tests use these (one compile per shape instead of one per eager op);
# test_jit_and_sharded_match_eager compares them with the plain eager functions.
quantize_jit = jax.jit(nf4.quantize, static_argnames=('block_size', 'double_quant',
                                                      'absmax_block_size'))
dequantize_jit = jax.jit(nf4.dequantize, static_argnames=('shape', 'dtype'))
bound_jit = jax.jit(nf4.max_abs_error_bound, static_argnames=('double_quant',))


def padded_blocks(x, block_size=64):
  """numpy (any shape) -> (num_blocks, block_size) float64, zero-padded."""
  flat = np.asarray(x, np.float64).reshape(-1)
  return np.pad(flat, (0, -flat.size % block_size)).reshape(-1, block_size)


def unpack_codes(packed, n):
  """uint8 (ceil(n / 2),) -> level indices (n,): high nibble first, as documented."""
  packed = np.asarray(packed)
  return np.stack([packed >> 4, packed & 0xF], axis=1).reshape(-1)[:n]


def absmax_error_bound(absmax, absmax_block_size=256):
  """Per block: half a step of the linear int8 code of absmax - mean, max|centred| / 254, the
  scale being rounded up by at most 2^-16 relative (17 significant bits)."""
  centred = padded_blocks(absmax - absmax.mean(), absmax_block_size)
  spread = np.abs(centred).max(axis=1) / 254 * (1 + 2.0 ** -16)
  return np.repeat(spread, absmax_block_size)[:absmax.size]


def reference_bound(w, double_quant):
  """numpy float64 (num_blocks, 64): half the gap around w / absmax, times absmax (+ the absmax
  error with double quantisation)."""
  blocks = padded_blocks(w)
  absmax = np.abs(blocks).max(axis=1)
  u = blocks / np.where(absmax > 0, absmax, 1)[:, None]
  upper = np.clip(np.searchsorted(LEVELS64, u, side='right'), 1, 15)  # first level > u
  half_gap = (LEVELS64[upper] - LEVELS64[upper - 1]) / 2
  bound = half_gap * absmax[:, None]
  if double_quant:
    bound = bound + absmax_error_bound(absmax)[:, None]
  return bound


def test_levels_are_the_published_values():
  assert nf4.NF4_LEVELS.dtype == np.float32 and nf4.NF4_LEVELS.shape == (16,)
  np.testing.assert_array_equal(nf4.NF4_LEVELS, np.array(PUBLISHED_NF4, np.float32))
  assert np.all(np.diff(nf4.NF4_LEVELS) > 0)
  assert nf4.NF4_LEVELS[7] == 0 and nf4.NF4_LEVELS[0] == -1 and nf4.NF4_LEVELS[15] == 1
  assert (nf4.BLOCK_SIZE, nf4.ABSMAX_BLOCK_SIZE) == (64, 256)


def representable(shape, seed=0):
  """w whose every block is already level * absmax (one +-1 element fixes each absmax)."""
  rng = np.random.default_rng(seed)
  n = int(np.prod(shape))
  codes = rng.integers(0, 16, size=n)
  codes[::64] = rng.choice([0, 15], size=codes[::64].size)
  absmax = rng.lognormal(-3.0, 1.0, size=-(-n // 64)).astype(np.float32)
  w = nf4.NF4_LEVELS[codes] * np.repeat(absmax, 64)[:n]  # float32 product, as the decoder
  return w.reshape(shape), codes, absmax


def test_round_trip_exact_without_double_quant():
  w, codes, absmax = representable(ODD_SHAPE)
  q = quantize_jit(w, double_quant=False)
  assert set(q) == {'codes', 'absmax'}
  assert q['codes'].dtype == jnp.uint8 and q['codes'].shape == (-(-w.size // 2),)
  np.testing.assert_array_equal(q['absmax'], absmax)
  np.testing.assert_array_equal(unpack_codes(q['codes'], w.size), codes)
  out = dequantize_jit(q, shape=w.shape, dtype=jnp.float32)
  assert out.shape == w.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, w)  # bit for bit


def test_round_trip_with_double_quant_within_absmax_error():
  w, codes, absmax = representable(ODD_SHAPE, seed=1)
  q = quantize_jit(w)
  assert set(q) == {'codes', 'absmax_codes', 'absmax_scale', 'absmax_offset'}
  assert q['absmax_codes'].dtype == jnp.int8 and q['absmax_codes'].shape == (absmax.size,)
  assert q['absmax_scale'].shape == (-(-absmax.size // 256),) and q['absmax_offset'].shape == ()
  np.testing.assert_allclose(q['absmax_offset'], absmax.mean(), rtol=1e-6)
  np.testing.assert_array_equal(unpack_codes(q['codes'], w.size), codes)
  out = np.asarray(dequantize_jit(q, shape=w.shape, dtype=jnp.float32), np.float64)
  err = np.abs(out - w).reshape(-1)
  bound = np.abs(nf4.NF4_LEVELS[codes]) * np.repeat(absmax_error_bound(absmax), 64)[:w.size]
  assert np.all(err <= bound * (1 + 1e-5) + 1e-6 * absmax.max())
  assert err.max() > 0  # the absmax really is compressed


@pytest.mark.parametrize('double_quant', [False, True])
@pytest.mark.parametrize('dist,shape', [('normal', ODD_SHAPE), ('student_t', (7, 11, 113))])
def test_error_bound_and_nearest_level(dist, shape, double_quant):
  rng = np.random.default_rng(2)
  w = (rng.standard_normal(shape) if dist == 'normal' else rng.standard_t(3, shape)) * 0.02
  w = w.astype(np.float32)
  q = quantize_jit(w, double_quant=double_quant)
  n = w.size

  # Each element's error is within half the gap between the levels around it (times absmax).
  out = np.asarray(dequantize_jit(q, shape=shape, dtype=jnp.float32), np.float64)
  err = padded_blocks(out - w)
  bound = reference_bound(w, double_quant)
  scale = np.abs(w).max()
  assert np.all(np.abs(err).reshape(-1)[:n]
                <= bound.reshape(-1)[:n] * (1 + 1e-5) + 1e-6 * scale)
  # The bound is tight (half the widest gap is reached), so it would catch a coarser rounding.
  assert np.max(np.abs(err).reshape(-1)[:n] / bound.reshape(-1)[:n]) > 0.9
  # The module's helper agrees with this independent computation.
  helper = np.asarray(bound_jit(w, double_quant=double_quant))
  assert helper.shape == shape
  np.testing.assert_allclose(helper.reshape(-1), bound.reshape(-1)[:n],
                             rtol=1e-5, atol=1e-5 * scale)

  # The chosen code is the argmin over the levels of |w / absmax - level|.
  blocks = padded_blocks(w)
  absmax = np.abs(blocks).max(axis=1)
  u = (blocks / absmax[:, None]).reshape(-1)[:n]
  dist_to_levels = np.abs(u[:, None] - LEVELS64)
  codes = unpack_codes(q['codes'], n)
  chosen = dist_to_levels[np.arange(n), codes]
  assert np.all(chosen <= dist_to_levels.min(axis=1) + 1e-6)
  sorted_dist = np.sort(dist_to_levels, axis=1)
  clear = sorted_dist[:, 1] - sorted_dist[:, 0] > 1e-6  # not within float rounding of a tie
  np.testing.assert_array_equal(codes[clear], dist_to_levels.argmin(axis=1)[clear])


def test_ties_go_to_the_lower_level():
  midpoints = (nf4.NF4_LEVELS[:-1] + nf4.NF4_LEVELS[1:]) / np.float32(2)
  w = np.concatenate([[1.0], midpoints]).astype(np.float32)  # absmax 1: u is w exactly
  codes = unpack_codes(quantize_jit(w, double_quant=False)['codes'], w.size)
  np.testing.assert_array_equal(codes, [15] + list(range(15)))


def test_bits_per_parameter():
  n = 2 ** 20
  w = jnp.ones((n,), jnp.float32)
  assert nf4.bits_per_parameter(quantize_jit(w, double_quant=False), n) == 4.5
  with_dq = nf4.bits_per_parameter(quantize_jit(w), n)
  assert abs(with_dq - 4.127) < 1e-3
  assert with_dq == 4 + 8 / 64 + 32 / (64 * 256) + 32 / n


@pytest.mark.parametrize('double_quant', [False, True])
def test_jit_and_sharded_match_eager(double_quant):
  w = np.random.default_rng(3).standard_normal((512, 72)).astype(np.float32)
  eager = nf4.quantize(w, double_quant=double_quant)
  mesh = Mesh(np.array(jax.devices()[:8]), ('x',))
  w_sharded = jax.device_put(w, NamedSharding(mesh, PartitionSpec('x', None)))
  for w_in in (w, w_sharded):
    # On device-resident input nothing may go through the host (the guard raises if it does).
    with jax.transfer_guard('disallow' if w_in is w_sharded else 'allow'):
      jitted = quantize_jit(w_in, double_quant=double_quant)
      outs = {dtype: dequantize_jit(jitted, shape=w.shape, dtype=dtype)
              for dtype in (jnp.float32, jnp.bfloat16)}
    assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(eager)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jitted, eager)
    for dtype, out in outs.items():
      np.testing.assert_array_equal(out, nf4.dequantize(eager, w.shape, dtype))
      if w_in is w_sharded:
        assert out.sharding.device_set == set(mesh.devices.flat)


@pytest.mark.parametrize('double_quant', [False, True])
def test_zero_blocks_and_dtypes(double_quant):
  w = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)
  w[2] = 0.0  # one whole block of zeros
  q = quantize_jit(w, double_quant=double_quant)
  out32 = np.asarray(dequantize_jit(q, shape=w.shape, dtype=jnp.float32))
  assert not np.any(np.isnan(out32))
  np.testing.assert_array_equal(out32[2], 0.0)
  out16 = dequantize_jit(q, shape=w.shape)  # bfloat16 by default
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out16, out32.astype(jnp.bfloat16))
  # An all-zero tensor: every absmax 0, so the double-quant scale is 0 too; still exact zeros.
  zeros = quantize_jit(jnp.zeros((3, 50), jnp.bfloat16), double_quant=double_quant)
  np.testing.assert_array_equal(dequantize_jit(zeros, shape=(3, 50), dtype=jnp.float32), 0.0)
  with pytest.raises(ValueError):
    nf4.dequantize(q, (6, 64))


def test_nf4_beats_uniform_4bit_on_gaussian():
  w = np.random.default_rng(5).standard_normal((256, 1000)).astype(np.float32)
  q = quantize_jit(w, double_quant=False)
  mse_nf4 = np.mean((np.asarray(dequantize_jit(q, shape=w.shape, dtype=jnp.float32)) - w) ** 2)
  # Uniform 4-bit: 16 evenly spaced levels in [-1, 1], same 64-blocks and absmax, nearest level.
  blocks = padded_blocks(w)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  uniform = np.linspace(-1, 1, 16)
  u = blocks / absmax
  uq = uniform[np.abs(u[..., None] - uniform).argmin(-1)] * absmax
  mse_uniform = np.mean((uq - blocks) ** 2)  # 256000 is a multiple of 64: no padding counted
  assert mse_nf4 < 0.9 * mse_uniform, (mse_nf4, mse_uniform)
