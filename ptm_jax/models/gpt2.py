"""GPT-2: a pre-LN causal decoder with learned positions and an LM head tied to the embeddings.

Heads, by `GPT2.head` (the transformers architecture in brackets):
  None  (GPT2Model)        last_hidden_state (B, T, D), after the final LayerNorm ln_f
  'lm'  (GPT2LMHeadModel)  logits (B, T, V) = last_hidden_state @ wte.T

With decode=True the attention keys/values go to a 'cache' collection (see
`ptm_jax.models.generate`): the prompt and then one token at a time can be fed, with explicit
position_ids and an attention_mask over the whole cache.
"""

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ptm_jax.models import layers
from ptm_jax.models import outputs

HEADS = (None, 'lm')


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None  # None: 4 * hidden_size, as in transformers.
  hidden_act: str = 'gelu_new'
  max_position_embeddings: int = 1024
  layer_norm_eps: float = 1e-5
  dropout: float = 0.1
  embedding_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  # transformers' variants that this implementation does not compute; kept so that a config.json
  # asking for them fails loudly instead of loading into a model that computes something else.
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  add_cross_attention: bool = False
  tie_word_embeddings: bool = True
  # Not in transformers: False drops every bias of the blocks and LayerNorms (nanoGPT's
  # bias=False). Such a model trains and generates here but cannot be saved as transformers'
  # GPT-2, which has biases.
  use_bias: bool = True

  # Our field -> transformers' config.json key.
  HF_NAMES: ClassVar[dict[str, str]] = {
      'hidden_size': 'n_embd', 'num_layers': 'n_layer', 'num_heads': 'n_head',
      'mlp_dim': 'n_inner', 'hidden_act': 'activation_function',
      'max_position_embeddings': 'n_positions', 'layer_norm_eps': 'layer_norm_epsilon',
      'dropout': 'resid_pdrop', 'embedding_dropout': 'embd_pdrop',
      'attention_dropout': 'attn_pdrop'}
  # Our fields that transformers' GPT-2 lacks: left out of config.json, and a non-default value
  # refuses to save.
  NOT_IN_HF: ClassVar[tuple[str, ...]] = ('use_bias',)

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size (n_embd) {self.hidden_size} is not divisible by num_heads '
                       f'(n_head) {self.num_heads}.')
    layers.activation(self.hidden_act)  # Fails early on an unknown activation.
    unsupported = {'scale_attn_weights': (self.scale_attn_weights, True),
                   'scale_attn_by_inverse_layer_idx': (self.scale_attn_by_inverse_layer_idx, False),
                   'add_cross_attention': (self.add_cross_attention, False),
                   'tie_word_embeddings': (self.tie_word_embeddings, True)}
    for name, (value, supported) in unsupported.items():
      if value != supported:
        raise NotImplementedError(f'GPT-2 with {name}={value} is not implemented; only '
                                  f'{name}={supported} (the released GPT-2 checkpoints) is.')

  @property
  def intermediate_size(self) -> int:
    return 4 * self.hidden_size if self.mlp_dim is None else self.mlp_dim


PRESETS = {
    'gpt2-small': GPT2Config(),  # 124M
    'gpt2-medium': GPT2Config(hidden_size=1024, num_layers=24, num_heads=16),  # 355M
    'gpt2-large': GPT2Config(hidden_size=1280, num_layers=36, num_heads=20),  # 774M
    'gpt2-xl': GPT2Config(hidden_size=1600, num_layers=48, num_heads=25),  # 1.5B
    'gpt2-tiny': GPT2Config(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=2,
                            max_position_embeddings=128, bos_token_id=1023, eos_token_id=1023),
}


class GPT2Transformer(nn.Module):
  """wte + wpe, pre-LN causal blocks, ln_f: transformers' GPT2Model."""
  config: GPT2Config
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None  # None (let JAX pick), 'xla' or 'cudnn'.
  layer_stack: layers.LayerStack = layers.LayerStack()  # remat / scan over the blocks

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxS=None, position_ids_BxT=None, *,
               deterministic: bool = True, decode: bool = False):
    cfg = self.config
    # Decoding steps take the whole cache's mask, checked against the cache.
    b, t = layers.check_token_inputs(input_ids_BxT, None if decode else attention_mask_BxS)
    layers.check_length(t, cfg.max_position_embeddings)
    if position_ids_BxT is None:
      if decode and not self.is_initializing():
        # The module cannot tell where in the cache the new tokens go.
        raise ValueError('GPT-2 with decode=True needs position_ids (the positions of the new '
                         'tokens); ptm_jax.models.generate passes them.')
      position_ids_BxT = jnp.arange(t)[None, :]
    emb = lambda n, name, axes: layers.embed(
        n, cfg.hidden_size, axes, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
        std=cfg.initializer_range)
    x_BxTxD = (emb(cfg.vocab_size, 'wte', ('vocab', 'embed'))(input_ids_BxT)
               + emb(cfg.max_position_embeddings, 'wpe', ('position', 'embed'))(position_ids_BxT))
    x_BxTxD = nn.Dropout(cfg.embedding_dropout)(x_BxTxD, deterministic=deterministic)

    # Padding only: the causal part is the attention's own (is_causal, or the cache positions).
    mask = layers.padding_mask(attention_mask_BxS)
    # Two residual projections per block add up over depth: GPT-2 scales their init down.
    out_init_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers)
    x_BxTxD = layers.transformer_stack(
        x_BxTxD, mask, num_layers=cfg.num_layers, causal=True, deterministic=deterministic,
        decode=decode, num_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads,
        mlp_dim=cfg.intermediate_size, activation=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps, norm_first=True, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, dtype=self.dtype,
        param_dtype=self.param_dtype, init_std=cfg.initializer_range,
        out_init_std=out_init_std, attention_impl=self.attention_impl,
        layer_stack=self.layer_stack, use_bias=cfg.use_bias)
    x_BxTxD = layers.layer_norm(cfg.layer_norm_eps, name='ln_f', dtype=self.dtype,
                                param_dtype=self.param_dtype, use_bias=cfg.use_bias)(x_BxTxD)
    return outputs.BaseModelOutput(last_hidden_state=x_BxTxD)


class GPT2(nn.Module):
  """GPT-2 with one of the heads in HEADS. Inputs are int32 (B, T) arrays.

  attention_mask: (B, T) 1 for real tokens, 0 for padding (as keys); with decode=True it covers
  the whole cache, (B, max_length). position_ids: (B, T) or (1, T), default 0..T-1.
  """
  config: GPT2Config
  head: str | None = None
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None  # None (let JAX pick), 'xla' or 'cudnn'.
  layer_stack: layers.LayerStack = layers.LayerStack()  # remat / scan over the blocks

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, position_ids=None, *,
               deterministic: bool = True, decode: bool = False):
    if self.head not in HEADS:
      raise ValueError(f'Unknown GPT-2 head {self.head!r}; choose one of {HEADS}.')
    base = GPT2Transformer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                           attention_impl=self.attention_impl, layer_stack=self.layer_stack,
                           name='transformer')
    encoded = base(input_ids, attention_mask, position_ids, deterministic=deterministic,
                   decode=decode)
    if self.head is None:
      return encoded
    x_BxTxD = encoded.last_hidden_state
    wte_VxD = nn.unbox(base.variables['params']['wte']['embedding'])
    logits_BxTxV = layers.tied_logits(x_BxTxD, jnp.asarray(wte_VxD, self.dtype))
    return outputs.CausalLMOutput(logits=logits_BxTxV, last_hidden_state=x_BxTxD)

  def example_inputs(self, batch_size: int = 1, length: int = 8) -> dict[str, np.ndarray]:
    """Inputs that `init` and shape inference use."""
    length = min(length, self.config.max_position_embeddings)
    return {'input_ids': np.zeros((batch_size, length), np.int32),
            'attention_mask': np.ones((batch_size, length), np.int32)}
