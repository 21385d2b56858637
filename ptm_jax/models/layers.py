"""Transformer pieces shared by BERT, ViT, GPT-2 and CLIP.

Every parameter is created through `nn.with_logical_partitioning`, so that the sharding engine
(`ptm_jax.partitioning`) can map its logical axes onto a device mesh. The logical axis names:

  vocab     token-embedding rows              embed    the model (residual) width
  heads     the joined heads x head_dim axis  mlp      the feed-forward hidden width
  position  rows of a position table          classes  classifier outputs
  conv_in / conv_out  channels of a convolution kernel (H, W, in, out)
  embed_out the output side of a square (embed -> embed) or projection kernel; an axis name may
            appear only once per parameter

Shapes in names follow nanodo: x_BxTxD is (batch, tokens, width); N heads of H dims.
Parameters default to float32; `dtype` is the compute dtype (bf16 for mixed precision).
"""

import contextlib
import contextvars
import dataclasses
import functools
import re
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]


def traced_platform() -> str:
  """The platform a function being traced now will run on: that of the mesh set by
  `jax.set_mesh` (its abstract mesh carries the devices' platform), else JAX's default backend.

  `by_platform` reads it while tracing. A computation placed on another platform than this one
  (CPU devices on a GPU machine, with no mesh set) gets the other branch, which computes the same
  values."""
  abstract_device = jax.sharding.get_abstract_mesh().abstract_device  # None: no mesh set
  return abstract_device.platform if abstract_device is not None else jax.default_backend()


def by_platform(*args, cpu: Callable, default: Callable):
  """cpu(*args) where the traced computation runs on CPU (`traced_platform`), else default(*args).

  Every use here has two branches that compute the same values, laid out for XLA's CPU backend
  or for the others. `lax.platform_dependent` would defer the choice to lowering, but it traces
  and differentiates both branches inside a conditional: a train step of GPT-2 small's width
  and depth traced in 5.0 s with it against 2.5 s with the branch chosen here.
  """
  return (cpu if traced_platform() == 'cpu' else default)(*args)


def gelu_exact(x):
  """GELU with the erf form, x / 2 * (1 + erf(x / sqrt(2))), as BERT, ViT and torch.nn.GELU()
  compute it. Written with erf, as torch does, rather than jax.nn.gelu's erfc (they agree to 1e-6
  on [-10, 10]): XLA's CPU erf is a short polynomial where erfc needs exp and branches, a tenth
  of the shakespeare_char step."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


def gelu_tanh(x):
  """GELU with the tanh approximation ("gelu_new" in GPT-2)."""
  return jax.nn.gelu(x, approximate=True)


def quick_gelu(x):
  """CLIP's x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# Keys are transformers' `hidden_act` names, so a config.json maps straight onto a function.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': gelu_exact,
    'gelu_new': gelu_tanh,
    'gelu_pytorch_tanh': gelu_tanh,
    'gelu_fast': gelu_tanh,
    'quick_gelu': quick_gelu,
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
    'tanh': jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f'Unknown activation {name!r}; known: {sorted(ACTIVATIONS)}.') from None


def tied_logits(x_BxTxD: jax.Array, embedding_VxD: jax.Array) -> jax.Array:
  """Logits against a (tied) embedding table, einsum('btd,vd->btv'): (B, T, D) -> (B, T, V).

  On CPU the product is taken vocabulary-major, (V, D) x (B*T, D) -> (V, B*T), and then
  transposed: XLA's Eigen kernels run it about 1.6x faster that way than with the table as the
  transposed right-hand operand (GPT-2's LM head, 1024 tokens x 50,257 on 2 cores: 299-311 ms
  against 555-580, README: Benchmarks), and the transpose costs about 80 ms of that back. The
  optimization barrier keeps XLA from folding the transpose into the dot. The cross-entropy
  over a vocabulary (`objectives._cross_entropy`) moves the class axis back to the front on
  CPU, which cancels this transpose: the loss reads the product as it was written and its
  gradient comes back vocabulary-major (GPT-2's head and loss, forward and backward, 1.19 to
  0.70 s; experiments/PERFORMANCE.md); other readers of the logits get the transposed copy. The
  same products either way (the logits were bit-identical in
  the checks made, the gradients equal to float rounding). Other platforms take the einsum over
  the table padded to a multiple of VOCABULARY_MULTIPLE rows (`padded_vocabulary_logits`).
  """
  def vocabulary_major(x, table):
    b, t, d = x.shape
    logits_VxN = jax.lax.dot_general(table, x.reshape(b * t, d), (((1,), (1,)), ((), ())))
    # Reshaped before the transpose: the loss's move of the class axis to the front is then a
    # transpose of a transpose, which XLA folds away (across a reshape it does not).
    logits_VxBxT = jax.lax.optimization_barrier(logits_VxN).reshape(table.shape[0], b, t)
    return logits_VxBxT.transpose(1, 2, 0)

  return by_platform(
      x_BxTxD, embedding_VxD, cpu=vocabulary_major,
      default=lambda x, table: padded_vocabulary_logits(x, table, VOCABULARY_MULTIPLE))


# Off CPU, `tied_logits` pads its table with zero rows to a multiple of this many (1: as it is).
# GPT-2's 50,257 is odd, so the (B*T, V) logits' rows are not 16-byte aligned for the GPU's matrix
# units; at 50,304 GPT-2 small's bf16 train step (16 x 1024 tokens, one H200) took 37.8-38.9 ms
# against 43.9 ms without (README: Benchmarks). CPU keeps the unpadded vocabulary-major dot.
VOCABULARY_MULTIPLE = 128


def padded_vocabulary_logits(x_BxTxD: jax.Array, embedding_VxD: jax.Array,
                             multiple: int) -> jax.Array:
  """einsum('btd,vd->btv') with the table padded by zero rows to a multiple of `multiple` and the
  logits of the padding sliced off: the same values and gradients, (B, T, D) -> (B, T, V)."""
  vocab = embedding_VxD.shape[0]
  pad = -vocab % multiple
  if pad:
    embedding_VxD = jnp.pad(embedding_VxD, ((0, pad), (0, 0)))
  logits = jnp.einsum('btd,vd->btv', x_BxTxD, embedding_VxD)
  return logits[..., :vocab] if pad else logits


@jax.custom_jvp
def cotangent_barrier(x: jax.Array) -> jax.Array:
  """The identity, whose gradient (cotangent) XLA's CPU backend must write out whole.

  Forward and backward compute exactly x and the incoming gradient. It exists for XLA's CPU
  fusion pass, which otherwise fuses long elementwise gradient chains into every consumer: the
  residual-stream gradient (the sum of each later layer's LayerNorm backward) was recomputed by
  each layer's weight-gradient fusion, work quadratic in depth, and elementwise backward code
  (GELU's, LayerNorm's) was evaluated inside the transposing copies that feed the weight-gradient
  dots, a slow strided loop. A conditional is not fused through, so on CPU the tangent goes
  through `lax.cond` on a predicate that is always true but that XLA cannot fold; on other
  platforms (`by_platform`) it is the plain identity. Defined by its JVP, so grad,
  jvp and their compositions all work.
  """
  return x


@cotangent_barrier.defjvp
def _cotangent_barrier_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  if x.size == 0 or not jnp.issubdtype(x.dtype, jnp.floating):
    return x, t

  def cpu(t):
    # A constant true that XLA cannot see through, so the conditional stays. It is a constant
    # on every device: a predicate read from x would be an element of a batch-sharded array,
    # which each step would broadcast from its device to the others before the backward pass.
    keep = jax.lax.optimization_barrier(jnp.bool_(True))
    return jax.lax.cond(keep, lambda t: t, jnp.zeros_like, t)

  return x, by_platform(t, cpu=cpu, default=lambda t: t)


def normal(std: float) -> Initializer:
  return nn.initializers.normal(stddev=std)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_dot(x_BxTxD: jax.Array, kernel_DxF: jax.Array, precision=None) -> jax.Array:
  """(..., D) x (D, F) -> (..., F), contracting x's last axis: the product inside nn.Dense.

  Its gradient is the usual one; on CPU it is written out so that XLA gets the kernel gradient
  in the form its fast (YNNPACK) matmul takes. JAX's own transpose of the product is
  transpose(dot(g, x)); with (B, T, .) activations XLA's CPU backend lowers that to a
  transposing copy of the output gradient g followed by a matmul in a layout the fast path
  refuses: 30 ms against 14 ms for the kernel gradient of a 4x256x768 -> 3072 layer on 2 cores.
  dot(x, g) over the leading axes avoids it for a widening layer (D <= F, XLA transposes the
  smaller x); a narrowing one keeps JAX's form, which transposes the smaller g. Other platforms
  keep JAX's own rule.

  A custom_vjp function has no forward-mode derivative: for jax.jvp through a model, build it
  under `plain_dense_autodiff()`.
  """
  return _dense_product(x_BxTxD, kernel_DxF, precision)


def _dense_product(x, kernel, precision):
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _dense_dot_fwd(x, kernel, precision):
  return dense_dot(x, kernel, precision), (x, kernel)


def _dense_dot_bwd(precision, saved, g):
  x, kernel = saved

  def cpu(x, kernel, g):
    lead = tuple(range(x.ndim - 1))
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
    if x.shape[-1] <= g.shape[-1]:
      dkernel = jax.lax.dot_general(x, g, ((lead, lead), ((), ())), precision=precision)
    else:
      dkernel = jax.lax.dot_general(g, x, ((lead, lead), ((), ())), precision=precision).T
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)

  def default(x, kernel, g):
    return jax.vjp(lambda x, kernel: _dense_product(x, kernel, precision), x, kernel)[1](g)

  return by_platform(x, kernel, g, cpu=cpu, default=default)


dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)

DENSE_DOT_NAME = 'dense_dot'
_PLAIN_DENSE_AUTODIFF = contextvars.ContextVar('plain_dense_autodiff', default=False)


@contextlib.contextmanager
def plain_dense_autodiff():
  """Within it, `dense` layers use lax.dot_general and JAX's own derivatives (forward mode
  included) instead of `dense_dot`. It acts where the model is traced (init/apply)."""
  token = _PLAIN_DENSE_AUTODIFF.set(True)
  try:
    yield
  finally:
    _PLAIN_DENSE_AUTODIFF.reset(token)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's dot_general hook (Dense contracts lhs's last axis with rhs's first)."""
  if (_PLAIN_DENSE_AUTODIFF.get() or preferred_element_type is not None
      or dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  # Named, so that the 'dots' remat policies still see it as a dot (the custom_vjp hides the
  # dot_general inside from jax.checkpoint_policies.checkpoint_dots).
  return checkpoint_name(dense_dot(lhs, rhs, precision), DENSE_DOT_NAME)


def dense(features: int, axes: tuple[str | None, str | None], *, name: str, dtype: Dtype,
          param_dtype: Dtype = jnp.float32, use_bias: bool = True,
          kernel_init: Initializer = normal(0.02)) -> nn.Dense:
  """nn.Dense whose (in, out) kernel and bias carry logical axis names."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      dot_general=_dense_dot_general,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def layer_norm(eps: float, *, name: str, dtype: Dtype, param_dtype: Dtype = jnp.float32,
               use_bias: bool = True) -> nn.LayerNorm:
  # use_fast_variance=False: the two-pass variance that torch computes, for exact parity.
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name, use_fast_variance=False,
      use_bias=use_bias,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


def embed(num: int, features: int, axes: tuple[str | None, str | None], *, name: str,
          dtype: Dtype, param_dtype: Dtype = jnp.float32, std: float = 0.02) -> nn.Embed:
  return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype, name=name,
                  embedding_init=nn.with_logical_partitioning(normal(std), axes))


def padding_mask(attention_mask_BxS: jax.Array | None) -> jax.Array | None:
  """(B, S) 1/0 mask of real/padded keys -> boolean (B, 1, 1, S) for every query and head."""
  if attention_mask_BxS is None:
    return None
  return attention_mask_BxS.astype(bool)[:, None, None, :]


def check_token_inputs(input_ids_BxT, attention_mask_BxT=None, token_type_ids_BxT=None):
  """(B, T) of input_ids. A 1-D input_ids, or a mask or segment ids of another shape (which would
  fail deep inside the attention, or broadcast over the batch), is refused with the shapes named."""
  shape = jnp.shape(input_ids_BxT)
  if len(shape) != 2:
    raise ValueError(f'input_ids must be (batch, length) token ids, got shape {shape}: add the '
                     'batch axis (input_ids[None]) for one sequence.')
  for name, value, what in (('attention_mask', attention_mask_BxT, 'one 1/0 entry'),
                            ('token_type_ids', token_type_ids_BxT, 'one segment id')):
    if value is not None and jnp.shape(value) != shape:
      raise ValueError(f'{name} has shape {jnp.shape(value)} but input_ids has {shape}: give '
                       f'{what} per token.')
  return shape


def check_length(length: int, max_length: int, what: str = 'input_ids'):
  if length > max_length:
    raise ValueError(
        f'{what} has {length} positions but the position table holds {max_length}: truncate the '
        f'input to {max_length} tokens (or resample the position embeddings).')


CAUSAL_QUERY_BLOCK = 64  # the fewest query rows per block of CPU causal attention


def _head_major_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask):
  """The numerics of `jax.nn.dot_product_attention`'s XLA implementation (logits in float32 at
  least, bf16 products accumulated in float32, masked logits at -0.7 x float32's max, softmax in
  float32), with the heads moved in front of the tokens before the two products. On XLA's CPU
  backend that layout runs ViT-B/16's attention (8 x 197 tokens, 12 heads) forward and backward
  in 57 ms against 67. mask: boolean, broadcastable to (B, N, T, S). -> (B, T, N, H)"""
  logits_dtype = jnp.promote_types(q_BxTxNxH.dtype, jnp.float32)
  precision = (jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q_BxTxNxH.dtype == jnp.bfloat16
               else None)
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q_BxTxNxH, k_BxSxNxH, v_BxSxNxH))  # (B, N, ., H)
  logits_BxNxTxS = jnp.einsum('bnth,bnsh->bnts', q, k, precision=precision,
                              preferred_element_type=logits_dtype)
  logits_BxNxTxS *= jnp.asarray(1.0 / np.sqrt(q.shape[-1]), logits_dtype)
  if mask is not None:
    large_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
    logits_BxNxTxS = jnp.where(mask, logits_BxNxTxS, jnp.asarray(large_negative, logits_dtype))
  probs = jax.nn.softmax(logits_BxNxTxS.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum('bnts,bnsh->bnth', probs, v).transpose(0, 2, 1, 3)


def _causal_mask(t: int, s: int, first_query: int = 0):
  """(1, 1, t, s): query first_query + i sees keys 0 .. first_query + i."""
  return (jnp.arange(s)[None, :] <= jnp.arange(first_query, first_query + t)[:, None])[None, None]


def dot_product_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask=None, *, causal: bool = False,
                          implementation: str | None = None):
  """`jax.nn.dot_product_attention`; on CPU head-major, and causal self-attention by query blocks.

  On CPU (unless a cudnn kernel is asked for) the attention is `_head_major_attention`, the same
  numerics in a layout XLA's CPU backend runs faster. Causal attention masks out half of its
  T x T logits, which that computes all the same: from T = 2 x CAUSAL_QUERY_BLOCK on, the
  queries are split into at most 8 blocks of at least CAUSAL_QUERY_BLOCK rows, and each block
  attends only to the keys up to its last query: the same result (each query's softmax is over
  the same keys) for 10/16 of the work at 4 blocks. GPT-2's 12 heads x 256 tokens (batch 4): 37
  to 27 ms forward and backward on 2 cores; 1024 tokens: 236 to 99 ms. Other platforms take the
  plain call. mask: boolean, broadcastable to (B, N, T, S). -> (B, T, N, H)
  """
  def whole(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        implementation=implementation)

  if implementation == 'cudnn':
    return whole(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH)
  t, s = q_BxTxNxH.shape[1], k_BxSxNxH.shape[1]

  def cpu(q, k, v):
    if not causal:
      return _head_major_attention(q, k, v, mask)
    if t != s or t < 2 * CAUSAL_QUERY_BLOCK:
      visible = _causal_mask(t, s)
      return _head_major_attention(q, k, v, visible if mask is None
                                   else jnp.logical_and(mask, visible))
    rows = max(CAUSAL_QUERY_BLOCK, -(-t // 8))
    outs = []
    for start in range(0, t, rows):
      end = min(start + rows, t)  # the block's queries see keys [0, end)
      visible = _causal_mask(end - start, end, start)
      if mask is not None:
        block_mask = mask[:, :, start:end] if mask.shape[2] > 1 else mask
        block_mask = block_mask[..., :end] if mask.shape[3] > 1 else block_mask
        visible = jnp.logical_and(block_mask, visible)
      outs.append(_head_major_attention(q[:, start:end], k[:, :end], v[:, :end], visible))
    return jnp.concatenate(outs, axis=1)

  return by_platform(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, cpu=cpu, default=whole)


class MultiHeadAttention(nn.Module):
  """Self-attention with separate query/key/value/out projections (torch's layout).

  Attention runs through `jax.nn.dot_product_attention`, so a fused kernel (cuDNN flash attention)
  can be picked on GPU; on CPU it is head-major, and causal self-attention goes by query blocks
  (`dot_product_attention`). The projections are `dense` layers (`dense_dot`). Dropout on the
  attention probabilities has no fused form: while it is active (training with
  attention_dropout > 0) the probabilities are computed explicitly.

  With decode=True the keys and values are appended to a 'cache' collection of shape
  (B, max_length, N, H) that `init_cache` sizes; queries attend to every cached position up to
  their own, so a causal model can be decoded one token (or one prompt) at a time.
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  attention_dropout: float = 0.0
  init_std: float = 0.02
  out_init_std: float | None = None  # GPT-2 scales its residual projections by 1/sqrt(2 L).
  attention_impl: str | None = None   # None (let JAX pick), 'xla' or 'cudnn'.

  @nn.compact
  def __call__(self, x_BxTxD, mask=None, *, causal: bool = False, deterministic: bool = True,
               decode: bool = False):
    """x_BxTxD -> (B, T, D). mask: boolean, broadcastable to (B, N, T, S); True = attend."""
    b, t, d = x_BxTxD.shape
    inner = self.num_heads * self.head_dim
    proj = functools.partial(dense, inner, ('embed', 'heads'), dtype=self.dtype,
                             param_dtype=self.param_dtype, use_bias=self.use_bias,
                             kernel_init=normal(self.init_std))
    split = lambda y: cotangent_barrier(y).reshape(b, t, self.num_heads, self.head_dim)
    q_BxTxNxH = split(proj(name='query')(x_BxTxD))
    k_BxSxNxH = split(proj(name='key')(x_BxTxD))
    v_BxSxNxH = split(proj(name='value')(x_BxTxD))

    if decode:
      k_BxSxNxH, v_BxSxNxH, mask = self._append_to_cache(k_BxSxNxH, v_BxSxNxH, mask, causal)
      causal = False  # folded into the mask above
    k_BxSxNxH, v_BxSxNxH, mask, causal = self.extend_keys(k_BxSxNxH, v_BxSxNxH, mask, causal)

    if self.attention_dropout > 0.0 and not deterministic:
      out_BxTxNxH = self._attention_with_dropout(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask, causal)
    else:
      out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask, causal=causal,
                                          implementation=self.attention_impl)

    out_std = self.init_std if self.out_init_std is None else self.out_init_std
    return cotangent_barrier(dense(d, ('heads', 'embed'), name='out', dtype=self.dtype,
                                   param_dtype=self.param_dtype, use_bias=self.use_bias,
                                   kernel_init=normal(out_std))(out_BxTxNxH.reshape(b, t, inner)))

  def extend_keys(self, k_BxSxNxH, v_BxSxNxH, mask, causal: bool):
    """A no-op hook: prefix tuning (`ptm_jax.adapt.prompts`) intercepts it to put per-layer
    keys/values in front of the projected (and cached) ones. -> (keys, values, mask, causal)."""
    return k_BxSxNxH, v_BxSxNxH, mask, causal

  def _attention_with_dropout(self, q, k, v, mask, causal):
    logits_BxNxTxS = jnp.einsum('btnh,bsnh->bnts', q, k) / jnp.sqrt(self.head_dim).astype(q.dtype)
    if causal:
      causal_mask = _causal_mask(q.shape[1], k.shape[1])
      mask = causal_mask if mask is None else jnp.logical_and(mask, causal_mask)
    if mask is not None:
      logits_BxNxTxS = jnp.where(mask, logits_BxNxTxS, jnp.finfo(logits_BxNxTxS.dtype).min)
    probs = jax.nn.softmax(logits_BxNxTxS.astype(jnp.float32), axis=-1).astype(q.dtype)
    probs = nn.Dropout(self.attention_dropout)(probs, deterministic=False)
    return jnp.einsum('bnts,bsnh->btnh', probs, v)

  def _append_to_cache(self, k, v, mask, causal):
    initialised = self.has_variable('cache', 'cached_key')
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
    cache_index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
    if not initialised:  # `init` only sizes the cache.
      return k, v, mask
    t = k.shape[1]
    max_length = cached_key.value.shape[1]
    start = cache_index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, start, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, start, 0, 0))
    cache_index.value = start + t
    query_pos = start + jnp.arange(t)
    key_pos = jnp.arange(max_length)
    # Keys beyond the filled part of the cache are never attended; causal within the new block.
    visible_1x1xTxS = (key_pos[None, :] <= query_pos[:, None])[None, None]
    if not causal:
      visible_1x1xTxS = (key_pos < start + t)[None, None, None, :]
    mask = visible_1x1xTxS if mask is None else jnp.logical_and(mask, visible_1x1xTxS)
    return cached_key.value, cached_value.value, mask


class Mlp(nn.Module):
  """fc_in -> activation -> fc_out, the feed-forward half of every transformer block."""
  hidden_dim: int
  activation: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  out_init_std: float | None = None
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_BxTxD):
    d = x_BxTxD.shape[-1]
    h = dense(self.hidden_dim, ('embed', 'mlp'), name='fc_in', dtype=self.dtype,
              param_dtype=self.param_dtype, use_bias=self.use_bias,
              kernel_init=normal(self.init_std))(x_BxTxD)
    h = activation(self.activation)(cotangent_barrier(h))
    out_std = self.init_std if self.out_init_std is None else self.out_init_std
    return cotangent_barrier(dense(d, ('mlp', 'embed'), name='fc_out', dtype=self.dtype,
                                   param_dtype=self.param_dtype, use_bias=self.use_bias,
                                   kernel_init=normal(out_std))(h))


class TransformerBlock(nn.Module):
  """One encoder/decoder block; norm_first picks pre-LN (ViT, GPT-2, CLIP) or post-LN (BERT).

  pre-LN:  x = x + drop(attn(ln_attention(x)));  x = x + drop(mlp(ln_mlp(x)))
  post-LN: x = ln_attention(x + drop(attn(x)));  x = ln_mlp(x + drop(mlp(x)))
  """
  num_heads: int
  head_dim: int
  mlp_dim: int
  activation: str
  layer_norm_eps: float
  norm_first: bool
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  out_init_std: float | None = None
  attention_impl: str | None = None
  use_bias: bool = True  # False: no biases in the Dense layers or the LayerNorms (nanoGPT)

  @nn.compact
  def __call__(self, x_BxTxD, mask=None, *, causal: bool = False, deterministic: bool = True,
               decode: bool = False):
    ln = functools.partial(layer_norm, self.layer_norm_eps, dtype=self.dtype,
                           param_dtype=self.param_dtype, use_bias=self.use_bias)
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)
    attention = MultiHeadAttention(
        self.num_heads, self.head_dim, dtype=self.dtype, param_dtype=self.param_dtype,
        attention_dropout=self.attention_dropout, init_std=self.init_std,
        out_init_std=self.out_init_std, attention_impl=self.attention_impl,
        use_bias=self.use_bias, name='attention')
    mlp = Mlp(self.mlp_dim, self.activation, dtype=self.dtype, param_dtype=self.param_dtype,
              init_std=self.init_std, out_init_std=self.out_init_std, use_bias=self.use_bias,
              name='mlp')
    attend = lambda y: attention(y, mask, causal=causal, deterministic=deterministic,
                                 decode=decode)
    # The residual stream's gradient is written out at each half-block (see cotangent_barrier).
    x_BxTxD = cotangent_barrier(x_BxTxD)
    if self.norm_first:
      x_BxTxD = cotangent_barrier(x_BxTxD + drop(attend(ln(name='ln_attention')(x_BxTxD))))
      return x_BxTxD + drop(mlp(ln(name='ln_mlp')(x_BxTxD)))
    x_BxTxD = cotangent_barrier(ln(name='ln_attention')(x_BxTxD + drop(attend(x_BxTxD))))
    return ln(name='ln_mlp')(x_BxTxD + drop(mlp(x_BxTxD)))


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _is_zero_padding(padding) -> bool:
  if isinstance(padding, str):
    return padding.upper() == 'VALID'
  return all(tuple(pair) == (0, 0) for pair in padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, computed as one dot where the convolution is a matmul.

  Two convolutions are matmuls over the channels: a 1x1 kernel (after the stride's subsampling)
  and non-overlapping patches (kernel == stride, no padding: ViT's patch embedding). Written as
  dots, their gradients are dots too. XLA's CPU backend computes a convolution's kernel
  gradient with a slow generic kernel: on ResNet-50's 1x1 convolutions 2-6x slower than the
  same sum as a dot (README: Benchmarks). Any other convolution goes to lax unchanged. The sums
  are the same; only their order may differ (float rounding).

  Shapes (2-D, flax's layout): lhs (N, H, W, C), rhs (kh, kw, C, O) -> (N, H', W', O). Takes
  nn.Conv's `conv_general_dilated` arguments, so `nn.Conv(..., conv_general_dilated=this)`.
  """
  conv = functools.partial(
      jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if lhs.ndim != 4 or feature_group_count != 1 or not _is_zero_padding(padding):
    return conv()
  if dimension_numbers is None or (jax.lax.conv_dimension_numbers(  # None: lax's NCHW
      lhs.shape, rhs.shape, dimension_numbers) != jax.lax.conv_dimension_numbers(
          lhs.shape, rhs.shape, _NHWC)):
    return conv()
  if any(d not in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return conv()
  kh, kw, _, _ = rhs.shape
  sh, sw = window_strides
  dot = functools.partial(jax.lax.dot_general, precision=precision,
                          preferred_element_type=preferred_element_type)
  if (kh, kw) == (1, 1):
    x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
    return dot(x, rhs[0, 0], (((3,), (0,)), ((), ())))
  if (kh, kw) == (sh, sw):
    n, h, w, c = lhs.shape
    ho, wo = h // kh, w // kw   # VALID drops the rows and columns past the last whole patch
    patches = lhs[:, :ho * kh, :wo * kw, :].reshape(n, ho, kh, wo, kw, c)
    return dot(patches, rhs, (((2, 4, 5), (0, 1, 2)), ((), ())))
  return conv()


def _pool_windows(x_padded, window, strides, out_hw):
  """The kh * kw strided views of x_padded (N, Hp, Wp, C), one per window position, row-major."""
  (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
  return [((i, j), x_padded[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :])
          for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x_NxHxWxC, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]):
  """torch's MaxPool2d over NHWC (padding never wins): `nn.max_pool` with torch's gradient.

  The max of the window's strided views, and a hand-written backward pass that gives each
  window's gradient to its first maximal element in row-major order, as torch does (autodiff of
  the max would split it between ties). XLA's CPU backend runs the equivalent select-and-scatter
  slowly: ResNet-50's stem pool, forward and backward, took 54 ms against 13-20 ms this way on
  2 cores (README: Benchmarks).
  """
  return _max_pool_fwd(x_NxHxWxC, window, strides, padding)[0]


def _max_pool_geometry(x, window, strides, padding):
  (pt, pb), (pl, pr) = padding
  hp, wp = x.shape[1] + pt + pb, x.shape[2] + pl + pr
  if hp < window[0] or wp < window[1]:
    raise ValueError(f'max_pool: the padded input {hp}x{wp} is smaller than the window '
                     f'{window[0]}x{window[1]}.')
  return (hp - window[0]) // strides[0] + 1, (wp - window[1]) // strides[1] + 1


def _max_pool_fwd(x, window, strides, padding):
  out_hw = _max_pool_geometry(x, window, strides, padding)
  x_padded = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  out = None
  for _, view in _pool_windows(x_padded, window, strides, out_hw):
    out = view if out is None else jnp.maximum(out, view)
  return out, (x_padded, out)


def _max_pool_bwd(window, strides, padding, saved, dy):
  x_padded, out = saved
  out_hw = out.shape[1:3]
  (pt, _), (pl, _) = padding
  hp, wp = x_padded.shape[1:3]
  taken = jnp.zeros(out.shape, bool)
  dx_padded = jnp.zeros(x_padded.shape, dy.dtype)
  for (i, j), view in _pool_windows(x_padded, window, strides, out_hw):
    first = (view == out) & ~taken
    taken = taken | first
    # Back onto the padded grid: row i + k * sh holds output row k (interior padding sh - 1).
    spread = [(0, 0, 0),
              (i, hp - i - ((out_hw[0] - 1) * strides[0] + 1), strides[0] - 1),
              (j, wp - j - ((out_hw[1] - 1) * strides[1] + 1), strides[1] - 1),
              (0, 0, 0)]
    dx_padded = dx_padded + jax.lax.pad(jnp.where(first, dy, 0), jnp.zeros((), dy.dtype), spread)
  h, w = x_padded.shape[1] - sum(padding[0]), x_padded.shape[2] - sum(padding[1])
  return (dx_padded[:, pt:pt + h, pl:pl + w, :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def check_float_pixels(pixels):
  """Refuses integer images (uint8 straight from a decoder), which would run unnormalised."""
  if not jnp.issubdtype(pixels.dtype, jnp.floating):
    raise ValueError(f'pixel_values have dtype {pixels.dtype}; the models take float images '
                     'normalised as their checkpoints were trained, (x / 255 - mean) / std with '
                     'the family\'s ptm_jax.data.image.NORMALIZATION: convert them first.')


class PatchEmbedding(nn.Module):
  """Non-overlapping patches: a conv whose stride is its kernel, (B, H, W, C) -> (B, P, D)."""
  patch_size: int
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, pixels_BxHxWxC):
    check_float_pixels(pixels_BxHxWxC)
    b, h, w, _ = pixels_BxHxWxC.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'Image size {h}x{w} is not divisible by the patch size {p}: resize or '
                       f'crop the images to a multiple of {p}.')
    x = nn.Conv(self.features, (p, p), strides=(p, p), padding='VALID', use_bias=self.use_bias,
                dtype=self.dtype, param_dtype=self.param_dtype, name='projection',
                conv_general_dilated=conv_general_dilated,
                kernel_init=nn.with_logical_partitioning(
                    normal(self.init_std), (None, None, 'conv_in', 'embed')),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))(
                    pixels_BxHxWxC)
    return x.reshape(b, (h // p) * (w // p), self.features)


# Rematerialisation policies (jax.checkpoint_policies): what a block keeps from its forward pass
# for the backward pass; the rest is recomputed. 'full' keeps only the block's input.
_policies = jax.checkpoint_policies
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    'none': None,
    'full': _policies.nothing_saveable,
    'dots': _policies.save_from_both_policies(
        _policies.checkpoint_dots, _policies.save_only_these_names(DENSE_DOT_NAME)),
    'dots_no_batch': _policies.save_from_both_policies(  # a Dense product has no batch axes
        _policies.dots_with_no_batch_dims_saveable, _policies.save_only_these_names(DENSE_DOT_NAME)),
}


@dataclasses.dataclass(frozen=True)
class LayerStack:
  """How transformer_stack runs its blocks; changes memory and compile time, not the maths.

  remat: a REMAT_POLICIES name. 'none' stores every activation for the backward pass.
  scan: one jax.lax.scan over the blocks (compile time flat in depth) instead of a Python loop.
    The parameters are then stacked, (num_layers, ...) under 'layers' instead of layer_0 ...
    layer_{n-1}; `stack_layers` / `unstack_layers` convert between the two layouts.
  """
  remat: str = 'none'
  scan: bool = False

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'Unknown remat policy {self.remat!r}; choose one of '
                       f'{sorted(REMAT_POLICIES)}.')


def transformer_stack(x_BxTxD, mask=None, *, num_layers: int, causal: bool = False,
                      deterministic: bool = True, decode: bool = False,
                      layer_stack: LayerStack = LayerStack(), **block_fields):
  """num_layers TransformerBlocks in the calling module's scope -> (B, T, D).

  Call from inside a compact method; block_fields are TransformerBlock's fields. The one place
  every family builds its stack: blocks are named layer_0 ... layer_{n-1}, or stacked under
  'layers' with layer_stack.scan.
  """
  def apply_block(block, carry_BxTxD, _):
    return block(carry_BxTxD, mask, causal=causal, deterministic=deterministic,
                 decode=decode), None

  if layer_stack.remat != 'none':
    apply_block = nn.remat(apply_block, policy=REMAT_POLICIES[layer_stack.remat])
  if layer_stack.scan:
    scanned = nn.scan(apply_block, variable_axes={'params': 0, 'cache': 0},
                      split_rngs={'params': True, 'dropout': True}, length=num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
    # 'layers': the name stack_layers/unstack_layers and the optimizers' decay mask
    # (optimizers._STACKED_KEY) know the stacked parameters by.
    x_BxTxD, _ = scanned(TransformerBlock(**block_fields, name='layers'), x_BxTxD, None)
    return x_BxTxD
  for i in range(num_layers):
    x_BxTxD, _ = apply_block(TransformerBlock(**block_fields, name=f'layer_{i}'), x_BxTxD, None)
  return x_BxTxD


_LAYER_KEY = re.compile(r'layer_(\d+)$')


def stack_layers(tree):
  """Variables of a looped stack (layer_0 ... layer_{n-1}) -> the scanned layout ('layers').

  Works on any nesting (a whole `variables` dict, or params only); arrays gain a leading
  (num_layers,) axis. Inverse: `unstack_layers`.
  """
  if not isinstance(tree, dict):
    return tree
  indices = sorted(int(m.group(1)) for m in map(_LAYER_KEY.match, tree) if m)
  out = {k: stack_layers(v) for k, v in tree.items() if not _LAYER_KEY.match(k)}
  if indices:
    if indices != list(range(len(indices))):
      raise ValueError(f'Layers {indices} are not numbered 0..{len(indices) - 1}.')
    layers_ = [stack_layers(tree[f'layer_{i}']) for i in indices]
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers_)
  return out


def unstack_layers(tree):
  """The scanned layout ('layers', leading num_layers axis) -> layer_0 ... layer_{n-1}."""
  if not isinstance(tree, dict):
    return tree
  out = {k: unstack_layers(v) for k, v in tree.items() if k != 'layers'}
  if 'layers' in tree:
    n = jax.tree.leaves(tree['layers'])[0].shape[0]
    for i in range(n):
      out[f'layer_{i}'] = jax.tree.map(lambda x, i=i: x[i], tree['layers'])
  return out
