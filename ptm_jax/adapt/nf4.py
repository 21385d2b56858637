"""NF4 (4-bit NormalFloat): QLoRA's storage format for frozen base kernels, in pure JAX.

Format (Dettmers et al. 2023, QLoRA; bitsandbytes `quant_type='nf4'`):
  - flatten the tensor (C order) and cut it into blocks of `block_size` (64) consecutive elements,
    the last one zero-padded;
  - each block keeps its absmax and is normalised by it into [-1, 1];
  - each normalised element takes the index (0..15) of the NEAREST of the 16 NF4_LEVELS. Ties (a
    value exactly halfway between two levels) go to the LOWER level, as `np.argmin` would pick;
  - two indices share a byte: element 2i in the high nibble, element 2i+1 in the low nibble.
Dequantisation is `NF4_LEVELS[code] * absmax` of its block.

Double quantisation compresses the per-block absmax (32 bits per 64 elements = 0.5 bit/param):
subtract their mean (`absmax_offset`), cut the centred values into blocks of `absmax_block_size`
(256) and store each as a symmetric linear int8 code with one float32 scale per block
(`scale = max|centred| / 127` rounded up to 17 significant bits, code = round(centred / scale)):
8/64 + 32/(64*256) = 0.127 bit/param, 4.127 in all. The 17-bit scale makes code * scale exact in
float32 (7 + 17 <= 24 bits), so the decoded absmax has the same bits whether or not the compiler
fuses `code * scale + offset` into an FMA (it does under jit, not eagerly); the mean is summed in
a fixed order for the same reason.

bitsandbytes instead codes the centred absmax with its "dynamic" 8-bit map (a signed
dynamic-exponent tree, about constant RELATIVE precision down to 1e-7) scaled by the block's
max|centred|. Same storage; what changes is only the absmax error: the linear int8 here has a
uniform ABSOLUTE error <= max|centred| / 254 (x (1 + 2^-16)) per 256-block (step 1/127 = 0.8% of
max|centred|), whereas the dynamic map's top decade steps by about 0.9/64 = 1.4% of max|centred|
and its lower decades ever more finely: absmax values close to the mean are stored more exactly,
the ones far from it less.
The 4-bit codes are computed from the exact absmax, so they match bitsandbytes' for the same
input (up to float rounding at the midpoints); only the reconstructed absmax differs, and
checkpoints quantised by bitsandbytes cannot be read with this decoder.

Everything is jnp on static shapes: it runs under jax.jit and on sharded arrays with no host
round trip. Keyword arguments (`block_size`, `double_quant`, `absmax_block_size`, `shape`,
`dtype`) are static: `jax.jit(quantize, static_argnames=(...))` or `functools.partial`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# The 16 NF4 values published with bitsandbytes/QLoRA (quantiles of N(0, 1), rescaled to [-1, 1],
# with an exact 0 so that zero padding and all-zero blocks are represented exactly).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)

# Decision thresholds between adjacent levels (15,): a value strictly above _MIDPOINTS[k] is
# nearer to level k + 1; a value exactly on a midpoint stays with the lower level.
_MIDPOINTS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2)

BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256
_INT8_MAX = 127


def _num_blocks(n: int, block_size: int) -> int:
  return -(-n // block_size)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
  """(n,) -> (ceil(n / block_size), block_size), zero-padded at the end."""
  n = x.shape[0]
  pad = _num_blocks(n, block_size) * block_size - n
  return jnp.pad(x, (0, pad)).reshape(-1, block_size)


def _nearest_level(u: jax.Array) -> jax.Array:
  """Any shape of normalised values in [-1, 1] -> uint8 codes 0..15 of the nearest level.

  Counting the midpoints below u is 15 fused compares: no (n, 16) distance matrix and no gather,
  so memory stays that of u whatever the tensor size.
  """
  codes = jnp.zeros(u.shape, jnp.uint8)
  for m in _MIDPOINTS:
    codes = codes + (u > m).astype(jnp.uint8)
  return codes


def _round_up_to_17_bits(x: jax.Array) -> jax.Array:
  """Non-negative float32 -> the next float32 up whose significand fits in 17 bits (24 - 7).

  Adding 0x7F to the bit pattern then clearing the low 7 mantissa bits rounds the magnitude up; a
  carry out of the mantissa moves into the exponent, which is the right result too.
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  bits = (bits + jnp.uint32(0x7F)) & jnp.uint32(0xFFFFFF80)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _mean_in_fixed_order(x: jax.Array) -> jax.Array:
  """(m,) -> () float32 mean, summed pairwise in an order fixed by the program.

  jnp.mean's reduction order is the compiler's choice (it differed between jit, eager and sharded
  inputs), and one ulp of offset changes every decoded absmax. Adding halves elementwise pins the
  order, so the stored offset is the same wherever it is computed.
  """
  m = x.shape[0]
  x = jnp.pad(x, (0, (1 << (m - 1).bit_length()) - m))  # zeros to a power of 2: exact
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    x = x[:half] + x[half:]
  return x[0] / m


def _quantize_absmax(absmax: jax.Array, absmax_block_size: int) -> dict[str, jax.Array]:
  """(num_blocks,) float32 -> int8 codes (num_blocks,), scales (ceil(num_blocks / B),), mean ()."""
  num_blocks = absmax.shape[0]
  offset = _mean_in_fixed_order(absmax)
  centred = _blocks(absmax - offset, absmax_block_size)          # (num_scale_blocks, B)
  scale = _round_up_to_17_bits(jnp.max(jnp.abs(centred), axis=1) / _INT8_MAX)  # (blocks / B,)
  # All absmax equal within a block (e.g. an all-zero tensor): scale 0, codes 0, no 0/0.
  safe_scale = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round(centred / safe_scale[:, None]), -_INT8_MAX, _INT8_MAX)
  return {'absmax_codes': codes.astype(jnp.int8).reshape(-1)[:num_blocks],
          'absmax_scale': scale,
          'absmax_offset': offset}


def _dequantize_absmax(q: dict[str, jax.Array], absmax_block_size: int) -> jax.Array:
  """The inverse of _quantize_absmax: (num_blocks,) float32, clamped at 0."""
  codes = q['absmax_codes']
  num_blocks = codes.shape[0]
  expected = _num_blocks(num_blocks, absmax_block_size)
  if q['absmax_scale'].shape != (expected,):
    raise ValueError(f'absmax_scale has shape {q["absmax_scale"].shape}, expected ({expected},) '
                     f'for {num_blocks} blocks and absmax_block_size={absmax_block_size}.')
  centred = _blocks(codes.astype(jnp.float32), absmax_block_size) * q['absmax_scale'][:, None]
  absmax = centred.reshape(-1)[:num_blocks] + q['absmax_offset']
  # A true absmax is >= 0; rounding can land a tiny one just below 0, which would flip the signs
  # of its block. 0 is nearer the truth than any negative value, so the error bound still holds.
  return jnp.maximum(absmax, 0.0)


def quantize(w: jax.Array, *, block_size: int = BLOCK_SIZE, double_quant: bool = True,
             absmax_block_size: int = ABSMAX_BLOCK_SIZE) -> dict[str, jax.Array]:
  """Any-shape float array (n elements) -> NF4 pytree of arrays.

  Returns:
    'codes': uint8 (ceil(n / 2),), two level indices per byte (element 2i in the high nibble),
      flattened w in C order. The zero padding of the last block is not stored (it would decode
      to 0 and is dropped anyway); an odd n leaves the last low nibble 0.
    Without double_quant: 'absmax' float32 (num_blocks,), num_blocks = ceil(n / block_size).
    With double_quant: 'absmax_codes' int8 (num_blocks,), 'absmax_scale' float32
      (ceil(num_blocks / absmax_block_size),), 'absmax_offset' float32 () (the mean absmax,
      subtracted before the 8-bit quantisation).
  """
  n = math.prod(w.shape)
  if n == 0:
    raise ValueError('Cannot quantise an empty array.')
  blocks = _blocks(jnp.asarray(w, jnp.float32).reshape(-1), block_size)   # (num_blocks, bs)
  absmax = jnp.max(jnp.abs(blocks), axis=1)                               # (num_blocks,)
  # An all-zero block divides by 1 instead of 0: its values are 0 -> code 7 (level 0.0).
  safe_absmax = jnp.where(absmax > 0, absmax, 1.0)
  codes = _nearest_level(blocks / safe_absmax[:, None]).reshape(-1)[:n]   # (n,)
  if n % 2:
    codes = jnp.pad(codes, (0, 1))
  pairs = codes.reshape(-1, 2)
  q = {'codes': (pairs[:, 0] << 4) | pairs[:, 1]}
  if double_quant:
    q.update(_quantize_absmax(absmax, absmax_block_size))
  else:
    q['absmax'] = absmax
  return q


def dequantize(q: dict[str, jax.Array], shape: tuple[int, ...], dtype=jnp.bfloat16, *,
               block_size: int = BLOCK_SIZE,
               absmax_block_size: int = ABSMAX_BLOCK_SIZE) -> jax.Array:
  """NF4 pytree -> array of `shape` in `dtype`: NF4_LEVELS[code] * absmax of its block.

  Computed in float32 and cast once at the end. `block_size` and `absmax_block_size` must be
  those given to `quantize` (the stored shapes do not determine them uniquely).
  """
  n = math.prod(shape)
  num_blocks = _num_blocks(n, block_size)
  if q['codes'].shape != (-(-n // 2),):
    raise ValueError(f'codes have shape {q["codes"].shape}, expected ({-(-n // 2)},) for {shape}.')
  if 'absmax' in q:
    absmax = q['absmax']
  else:
    absmax = _dequantize_absmax(q, absmax_block_size)
  if absmax.shape != (num_blocks,):
    raise ValueError(f'{absmax.shape[0]} absmax values, expected {num_blocks} for {shape} '
                     f'and block_size={block_size}.')
  packed = q['codes']
  codes = jnp.stack([packed >> 4, packed & 0xF], axis=1).reshape(-1)[:n]   # (n,)
  values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]                 # (n,) float32
  values = _blocks(values, block_size) * absmax[:, None]                   # (num_blocks, bs)
  return values.reshape(-1)[:n].reshape(shape).astype(dtype)


def bits_per_parameter(q: dict[str, jax.Array], num_params: int) -> float:
  """Total stored bits over all leaves of q, divided by num_params (4.5 single, ~4.127 double)."""
  leaves = jax.tree_util.tree_leaves(q)
  return sum(x.size * jnp.dtype(x.dtype).itemsize * 8 for x in leaves) / num_params


def max_abs_error_bound(w: jax.Array, *, block_size: int = BLOCK_SIZE, double_quant: bool = True,
                        absmax_block_size: int = ABSMAX_BLOCK_SIZE) -> jax.Array:
  """Any-shape w -> float32 array of w.shape: the format's bound on |dequantize(quantize(w)) - w|.

  For element x in a block of absmax a, u = x / a lies between two adjacent levels L_i <= u <= L_i+1
  and nearest-level rounding is off by at most (L_i+1 - L_i) / 2 in u, i.e. a * gap / 2 in x.
  With double quantisation the decoder uses a' instead of a: |L a' - u a| <= |a' - a| + a gap / 2
  (|L| <= 1), and the linear int8 code of a - mean is off by at most half a step, max|a - mean| /
  254 over its 256-block (x (1 + 2^-16) for the scale's rounding up). A few float32 ulps of
  (a + |mean|) cover the rounding of the arithmetic.
  """
  n = math.prod(w.shape)
  blocks = _blocks(jnp.asarray(w, jnp.float32).reshape(-1), block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  u = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  # Index i of the interval [L_i, L_i+1] holding u: the number of interior levels <= u.
  interval = jnp.zeros(u.shape, jnp.int32)
  for level in NF4_LEVELS[1:-1]:
    interval = interval + (u >= level).astype(jnp.int32)
  gaps = jnp.asarray(np.diff(NF4_LEVELS))                                  # (15,)
  bound = gaps[interval] / 2 * absmax[:, None]
  slack = absmax
  if double_quant:
    offset = _mean_in_fixed_order(absmax)
    spread = jnp.max(jnp.abs(_blocks(absmax - offset, absmax_block_size)), axis=1)
    half_step = spread / (2 * _INT8_MAX) * (1 + 2.0 ** -16)  # the 17-bit scale rounds up
    absmax_error = jnp.repeat(half_step, absmax_block_size)[:absmax.shape[0]]
    bound = bound + absmax_error[:, None]
    slack = absmax + jnp.abs(offset)
  bound = bound + 8 * np.finfo(np.float32).eps * slack[:, None]
  return bound.reshape(-1)[:n].reshape(w.shape)
