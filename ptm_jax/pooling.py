"""Sentence embeddings from token states: the pooling of sentence-transformers.

all-MiniLM-L6-v2 and most sentence-transformers models are `normalize(mean_pool(h, mask))`.
Pooling runs in float32 whatever the compute dtype, as sentence-transformers does.
"""

import jax.numpy as jnp

MODES = ('mean', 'cls', 'max')


def mean_pool(hidden_BxTxD: jnp.ndarray, attention_mask_BxT: jnp.ndarray) -> jnp.ndarray:
  """(B, T, D), (B, T) -> (B, D): mean over the tokens whose mask is 1 (padding excluded)."""
  mask_BxTx1 = jnp.asarray(attention_mask_BxT, jnp.float32)[..., None]
  summed_BxD = jnp.sum(jnp.asarray(hidden_BxTxD, jnp.float32) * mask_BxTx1, axis=1)
  # An all-padding row gives zeros rather than NaN (sentence-transformers' clamp at 1e-9).
  return summed_BxD / jnp.maximum(jnp.sum(mask_BxTx1, axis=1), 1e-9)


def max_pool(hidden_BxTxD: jnp.ndarray, attention_mask_BxT: jnp.ndarray) -> jnp.ndarray:
  """(B, T, D), (B, T) -> (B, D): per-feature max over the tokens whose mask is 1."""
  mask_BxTx1 = jnp.asarray(attention_mask_BxT, bool)[..., None]
  return jnp.max(jnp.where(mask_BxTx1, jnp.asarray(hidden_BxTxD, jnp.float32), -1e9), axis=1)


def cls_pool(hidden_BxTxD: jnp.ndarray, attention_mask_BxT: jnp.ndarray | None = None
             ) -> jnp.ndarray:
  """(B, T, D) -> (B, D): the first token's state ([CLS] for BERT, with right padding)."""
  del attention_mask_BxT  # Same signature as the other poolings.
  return jnp.asarray(hidden_BxTxD[:, 0], jnp.float32)


def l2_normalize(x_BxD: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """(B, D) -> (B, D) of unit L2 norm: x / max(|x|, eps) (sentence-transformers' Normalize)."""
  x_BxD = jnp.asarray(x_BxD, jnp.float32)
  norm_Bx1 = jnp.linalg.norm(x_BxD, axis=-1, keepdims=True)
  return x_BxD / jnp.maximum(norm_Bx1, eps)


def pool(hidden_BxTxD: jnp.ndarray, attention_mask_BxT: jnp.ndarray, mode: str = 'mean',
         normalize: bool = False) -> jnp.ndarray:
  """(B, T, D), (B, T) -> (B, D) sentence embeddings by `mode` (one of MODES)."""
  poolings = {'mean': mean_pool, 'cls': cls_pool, 'max': max_pool}
  if mode not in poolings:
    raise ValueError(f'Unknown pooling mode {mode!r}; choose one of {MODES}.')
  pooled_BxD = poolings[mode](hidden_BxTxD, attention_mask_BxT)
  return l2_normalize(pooled_BxD) if normalize else pooled_BxD
