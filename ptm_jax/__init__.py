"""ptm_jax: pre-trained models and transfer learning in JAX/Flax."""

from ptm_jax.hub.pretrained import from_pretrained
from ptm_jax.hub.pretrained import save_pretrained
from ptm_jax.hub.checkpoint_io import CheckpointError

__all__ = ['from_pretrained', 'save_pretrained', 'load_tokenizer', 'CheckpointError']


def load_tokenizer(path: str, **kwargs):
  """A `tokenizers.Tokenizer` from a checkpoint folder (see ptm_jax.hub.tokenizers)."""
  from ptm_jax.hub import tokenizers as _tokenizers
  return _tokenizers.load_tokenizer(path, **kwargs)
