"""BERT (and every config.json size of it, MiniLM included): post-LN encoder and its heads.

Heads, by `Bert.head` (the transformers architecture in brackets):
  None                       (BertModel)                    last_hidden_state, pooler_output
  'pretraining'              (BertForPreTraining)           prediction_logits, seq_relationship_logits
  'mlm'                      (BertForMaskedLM)              logits (B, T, V)
  'nsp'                      (BertForNextSentencePrediction) logits (B, 2)
  'sequence_classification'  (BertForSequenceClassification) logits (B, K)
  'token_classification'     (BertForTokenClassification)    logits (B, T, K)
The MLM decoder is tied to the word embeddings and has its own bias.
"""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ptm_jax.models import labels
from ptm_jax.models import layers
from ptm_jax.models import outputs

HEADS = (None, 'pretraining', 'mlm', 'nsp', 'sequence_classification', 'token_classification')
_HEADS_WITH_POOLER = (None, 'pretraining', 'nsp', 'sequence_classification')


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float | None = None
  initializer_range: float = 0.02
  pad_token_id: int = 0
  num_labels: int = 2
  # Class names by id, transformers' label2id and problem_type (see models.labels).
  id2label: tuple[str, ...] | None = labels.field()
  label2id: tuple[tuple[str, int], ...] | None = labels.field()
  problem_type: str | None = labels.field()

  # Our field -> transformers' config.json key.
  HF_NAMES: ClassVar[dict[str, str]] = {
      'num_layers': 'num_hidden_layers', 'num_heads': 'num_attention_heads',
      'dropout': 'hidden_dropout_prob', 'attention_dropout': 'attention_probs_dropout_prob'}

  def __post_init__(self):
    labels.normalise(self)
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads '
                       f'{self.num_heads}.')


PRESETS = {
    'bert-base': BertConfig(),
    'bert-large': BertConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    'minilm-l6-h384': BertConfig(hidden_size=384, num_layers=6, num_heads=12,
                                 intermediate_size=1536),
    'bert-tiny': BertConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=2,
                            intermediate_size=128, max_position_embeddings=128),
}


class BertEncoder(nn.Module):
  """Embeddings, the post-LN blocks and (optionally) the tanh pooler over [CLS]."""
  config: BertConfig
  add_pooler: bool = True
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None  # None (let JAX pick), 'xla' or 'cudnn'.
  layer_stack: layers.LayerStack = layers.LayerStack()  # remat / scan over the blocks

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxT=None, token_type_ids_BxT=None,
               position_ids_BxT=None, *, deterministic: bool = True):
    cfg = self.config
    _, t = layers.check_token_inputs(input_ids_BxT, attention_mask_BxT, token_type_ids_BxT)
    layers.check_length(t, cfg.max_position_embeddings)
    if token_type_ids_BxT is None:
      token_type_ids_BxT = jnp.zeros_like(input_ids_BxT)
    if position_ids_BxT is None:
      position_ids_BxT = jnp.arange(t)[None, :]
    emb = lambda n, name, axes: layers.embed(
        n, cfg.hidden_size, axes, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
        std=cfg.initializer_range)
    x_BxTxD = (emb(cfg.vocab_size, 'word_embeddings', ('vocab', 'embed'))(input_ids_BxT)
               + emb(cfg.max_position_embeddings, 'position_embeddings',
                     ('position', 'embed'))(position_ids_BxT)
               + emb(cfg.type_vocab_size, 'token_type_embeddings',
                     (None, 'embed'))(token_type_ids_BxT))
    x_BxTxD = layers.layer_norm(cfg.layer_norm_eps, name='embeddings_ln', dtype=self.dtype,
                                param_dtype=self.param_dtype)(x_BxTxD)
    x_BxTxD = nn.Dropout(cfg.dropout)(x_BxTxD, deterministic=deterministic)

    mask = layers.padding_mask(attention_mask_BxT)
    x_BxTxD = layers.transformer_stack(
        x_BxTxD, mask, num_layers=cfg.num_layers, deterministic=deterministic,
        num_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads,
        mlp_dim=cfg.intermediate_size, activation=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps, norm_first=False, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, dtype=self.dtype,
        param_dtype=self.param_dtype, init_std=cfg.initializer_range,
        attention_impl=self.attention_impl, layer_stack=self.layer_stack)

    pooled_BxD = None
    if self.add_pooler:
      pooled_BxD = jnp.tanh(layers.dense(
          cfg.hidden_size, ('embed', 'embed_out'), name='pooler', dtype=self.dtype,
          param_dtype=self.param_dtype,
          kernel_init=layers.normal(cfg.initializer_range))(x_BxTxD[:, 0]))
    return outputs.BaseModelOutput(last_hidden_state=x_BxTxD, pooler_output=pooled_BxD)


class Bert(nn.Module):
  """BERT with one of the heads in HEADS. Inputs are int32 (B, T) arrays."""
  config: BertConfig
  head: str | None = None
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None  # None (let JAX pick), 'xla' or 'cudnn'.
  layer_stack: layers.LayerStack = layers.LayerStack()  # remat / scan over the blocks

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True):
    if self.head not in HEADS:
      raise ValueError(f'Unknown BERT head {self.head!r}; choose one of {HEADS}.')
    cfg = self.config
    base = BertEncoder(cfg, add_pooler=self.head in _HEADS_WITH_POOLER, dtype=self.dtype,
                       param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                       layer_stack=self.layer_stack, name='bert')
    encoded = base(input_ids, attention_mask, token_type_ids, position_ids,
                   deterministic=deterministic)
    if self.head is None:
      return encoded
    x_BxTxD, pooled_BxD = encoded.last_hidden_state, encoded.pooler_output
    dense = lambda n, axes, name: layers.dense(
        n, axes, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.normal(cfg.initializer_range))
    drop = lambda y: nn.Dropout(cfg.classifier_dropout if cfg.classifier_dropout is not None
                                else cfg.dropout)(y, deterministic=deterministic)

    if self.head in ('pretraining', 'mlm'):
      h = layers.activation(cfg.hidden_act)(dense(cfg.hidden_size, ('embed', 'embed_out'),
                                                  'mlm_transform')(x_BxTxD))
      h = layers.layer_norm(cfg.layer_norm_eps, name='mlm_ln', dtype=self.dtype,
                            param_dtype=self.param_dtype)(h)
      word_embeddings = nn.unbox(base.variables['params']['word_embeddings']['embedding'])
      bias = self.param('mlm_bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ('vocab',)),
                        (cfg.vocab_size,), self.param_dtype)
      mlm_logits_BxTxV = (layers.tied_logits(h, jnp.asarray(word_embeddings, self.dtype))
                          + jnp.asarray(bias, self.dtype))
      if self.head == 'mlm':
        return outputs.ClassifierOutput(logits=mlm_logits_BxTxV, last_hidden_state=x_BxTxD)
      nsp_logits = dense(2, ('embed', 'classes'), 'nsp')(pooled_BxD)
      return outputs.PreTrainingOutput(prediction_logits=mlm_logits_BxTxV,
                                       seq_relationship_logits=nsp_logits,
                                       last_hidden_state=x_BxTxD)
    if self.head == 'nsp':
      return outputs.ClassifierOutput(logits=dense(2, ('embed', 'classes'), 'nsp')(pooled_BxD),
                                      last_hidden_state=x_BxTxD)
    if self.head == 'sequence_classification':
      logits = dense(cfg.num_labels, ('embed', 'classes'), 'classifier')(drop(pooled_BxD))
    else:
      logits = dense(cfg.num_labels, ('embed', 'classes'), 'classifier')(drop(x_BxTxD))
    return outputs.ClassifierOutput(logits=logits, last_hidden_state=x_BxTxD)

  def example_inputs(self, batch_size: int = 1, length: int = 8) -> dict[str, np.ndarray]:
    """Inputs that `init` and shape inference use."""
    length = min(length, self.config.max_position_embeddings)
    return {'input_ids': np.zeros((batch_size, length), np.int32),
            'attention_mask': np.ones((batch_size, length), np.int32)}
