"""Autoregressive generation for causal LMs (GPT-2) with a key/value cache.

`generate` sizes the attention 'cache' collection for prompt + new tokens (`init_cache`), feeds
the whole prompt once (prefill), then one token per step inside a jitted `jax.lax.fori_loop`.
`uncached_generate` recomputes the full forward every step with the same sampling and the same
per-step rng, so the two agree token for token: the test that the cache is exact.

Prompts of different lengths are padded on the LEFT with an attention_mask; positions then
count real tokens only (as transformers does), so a padded row generates what it would alone.
Shapes: B batch, T prompt length, N new tokens, L = T + N, V vocabulary.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptm_jax.models import layers


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How one token is picked from the logits; hashable, so jit specialises on it."""
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  greedy: bool = False
  eos_token_id: int | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f'temperature must be > 0, got {self.temperature}; use greedy=True for '
                       'argmax decoding.')
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f'top_k must be >= 1 (or None to disable), got {self.top_k}.')
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1] (or None to disable), got {self.top_p}.')


def filter_logits(logits_BxV: jax.Array, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """Sets the logits outside the top-k and outside the nucleus (top-p) to -inf.

  The nucleus is the smallest set of most likely tokens whose cumulative probability reaches
  top_p; the most likely token is always kept. top-k applies first, as in transformers.
  """
  if top_k is not None and top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p is not None and top_p < 1.0:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Probability of the tokens strictly before each one: a token is needed while that is < p.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    before_BxV = before_BxV.at[:, 0].set(0.0)  # the top token, exactly
    keep_BxV = before_BxV < top_p
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token ids (B,) from the last position's logits: argmax, or temperature/top-k/top-p."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if sampling.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def init_cache(module: nn.Module, batch: int, max_length: int):
  """Zeroed 'cache' collection for `batch` sequences of up to `max_length` tokens.

  The shapes come from jax.eval_shape of a decode-mode init, so no parameters are built.
  """
  ids = jnp.zeros((batch, max_length), jnp.int32)
  shapes = jax.eval_shape(
      lambda rng: module.init(rng, ids, decode=True), jax.random.key(0))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _positions(mask_BxL):
  """Positions that count only real (mask 1) tokens; padded ones get 0 and are never attended."""
  return jnp.maximum(jnp.cumsum(mask_BxL, axis=-1) - 1, 0).astype(jnp.int32)


def _pick(sampling, step, rng, logits_BxV, done_B):
  """Samples step `step`'s tokens; rows that already ended emit the pad token."""
  next_B = sample_logits(logits_BxV, jax.random.fold_in(rng, step), sampling)
  if sampling.eos_token_id is None:
    return next_B, done_B
  pad = sampling.eos_token_id if sampling.pad_token_id is None else sampling.pad_token_id
  next_B = jnp.where(done_B, pad, next_B)
  return next_B, done_B | (next_B == sampling.eos_token_id)


@functools.partial(jax.jit, static_argnames=('module', 'max_new_tokens', 'sampling', 'use_cache'))
def _generate(module, variables, prompt_BxT, prompt_mask_BxT, rng, *, max_new_tokens, sampling,
              use_cache):
  b, t = prompt_BxT.shape
  length = t + max_new_tokens
  mask_BxL = jnp.concatenate(
      [prompt_mask_BxT.astype(jnp.int32), jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)
  positions_BxL = _positions(mask_BxL)
  tokens_BxL = jnp.zeros((b, length), jnp.int32).at[:, :t].set(prompt_BxT)
  done_B = jnp.zeros((b,), bool)
  column = lambda x_BxL, i: jax.lax.dynamic_slice_in_dim(x_BxL, i, 1, axis=1)

  # The last token is only ever written: the model sees the L - 1 before it.
  fed_mask_BxF = mask_BxL[:, :-1]
  if use_cache:
    out, state = module.apply(
        {**variables, 'cache': init_cache(module, b, length - 1)}, prompt_BxT,
        attention_mask=fed_mask_BxF, position_ids=positions_BxL[:, :t], decode=True,
        mutable=['cache'])
    next_B, done_B = _pick(sampling, 0, rng, out.logits[:, -1], done_B)
    tokens_BxL = tokens_BxL.at[:, t].set(next_B)

    def step(i, carry):  # feeds token t+i-1, writes token t+i
      tokens_BxL, cache, done_B = carry
      here = t + i - 1
      out, state = module.apply(
          {**variables, 'cache': cache}, column(tokens_BxL, here), attention_mask=fed_mask_BxF,
          position_ids=column(positions_BxL, here), decode=True, mutable=['cache'])
      next_B, done_B = _pick(sampling, i, rng, out.logits[:, -1], done_B)
      tokens_BxL = jax.lax.dynamic_update_slice_in_dim(tokens_BxL, next_B[:, None], here + 1, 1)
      return tokens_BxL, state['cache'], done_B

    tokens_BxL, _, _ = jax.lax.fori_loop(1, max_new_tokens, step,
                                         (tokens_BxL, state['cache'], done_B))
    return tokens_BxL

  def full_step(i, carry):  # the whole forward; causality hides the unwritten tokens
    tokens_BxL, done_B = carry
    here = t + i - 1
    logits_BxLxV = module.apply(variables, tokens_BxL[:, :-1], attention_mask=fed_mask_BxF,
                                position_ids=positions_BxL[:, :-1]).logits
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxLxV, here, axis=1, keepdims=False)
    next_B, done_B = _pick(sampling, i, rng, logits_BxV, done_B)
    tokens_BxL = jax.lax.dynamic_update_slice_in_dim(tokens_BxL, next_B[:, None], here + 1, 1)
    return tokens_BxL, done_B

  tokens_BxL, _ = jax.lax.fori_loop(0, max_new_tokens, full_step, (tokens_BxL, done_B))
  return tokens_BxL


def generate(module: nn.Module, params, input_ids_BxT, max_new_tokens: int, *,
             rng: jax.Array | None = None, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, greedy: bool = False, attention_mask=None,
             eos_token_id: int | None = None, pad_token_id: int | None = None,
             use_cache: bool = True) -> jax.Array:
  """Extends each prompt by max_new_tokens tokens; returns the (B, T + N) int32 ids.

  Args:
    module: a causal LM whose output has `.logits` and that supports decode=True (GPT2, head 'lm').
    params: its variables ({'params': ...}, as from_pretrained returns) or the params tree.
    input_ids_BxT: int prompts, left-padded when attention_mask is given.
    rng: a jax.random key; needed unless greedy. Step i samples with fold_in(rng, i).
    temperature, top_k, top_p: sampling as in transformers (temperature, then top-k, then
      nucleus); None turns top-k / top-p off. transformers' generate(do_sample=True) has
      top_k=50 unless told otherwise: pass top_k=50 for its default. greedy: argmax instead.
    attention_mask: (B, T) 1/0 for prompts of different lengths, padded on the left.
    eos_token_id: a row that emits it is finished and then emits pad_token_id (default: eos).
    use_cache: False recomputes the full forward each step (see uncached_generate).
  """
  if getattr(module, 'head', 'lm') != 'lm':
    raise ValueError(f'generate needs a language-model head: build the module with head="lm" '
                     f'(this one has head={module.head!r}).')
  sampling = Sampling(temperature, top_k, top_p, greedy, eos_token_id, pad_token_id)
  if rng is None:
    if not greedy:
      raise ValueError('Sampling needs rng=jax.random.key(seed); or pass greedy=True.')
    rng = jax.random.key(0)
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
  prompt_BxT = np.asarray(input_ids_BxT)
  b, t = layers.check_token_inputs(prompt_BxT, attention_mask)
  if t == 0:
    raise ValueError(f'input_ids has no tokens (shape {prompt_BxT.shape}): give each row a '
                     'prompt of at least one token.')
  max_positions = getattr(module.config, 'max_position_embeddings', None)
  # The last new token is returned, never fed back: the model sees t + max_new_tokens - 1
  # positions (transformers' limit too).
  if max_positions is not None and t + max_new_tokens - 1 > max_positions:
    fix = (f'ask for at most {max_positions + 1 - t} new tokens or shorten the prompt'
           if t <= max_positions else f'shorten the prompt to at most {max_positions} tokens')
    raise ValueError(
        f'prompt + max_new_tokens is {t + max_new_tokens} tokens, so the model would see '
        f'{t + max_new_tokens - 1} positions, but its position table holds {max_positions}: '
        f'{fix}.')
  if attention_mask is None:
    mask_BxT = np.ones((b, t), np.int32)
  else:
    mask_BxT = np.asarray(attention_mask).astype(np.int32)
    if np.any(np.diff(mask_BxT, axis=1) < 0) or np.any(mask_BxT[:, -1] == 0):
      raise ValueError('generate needs prompts padded on the LEFT (attention_mask 0...0 1...1 '
                       'per row): new tokens follow the last prompt position.')
  variables = params if 'params' in params else {'params': params}
  return _generate(module, variables, jnp.asarray(prompt_BxT, jnp.int32), jnp.asarray(mask_BxT),
                   rng, max_new_tokens=max_new_tokens, sampling=sampling, use_cache=use_cache)


def uncached_generate(module: nn.Module, params, input_ids_BxT, max_new_tokens: int,
                      **kwargs) -> jax.Array:
  """`generate` without the cache: the full forward per step. Slow; a reference for tests."""
  return generate(module, params, input_ids_BxT, max_new_tokens, use_cache=False, **kwargs)
