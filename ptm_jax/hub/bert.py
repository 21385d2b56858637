"""BERT checkpoints (transformers' BertModel, BertFor*) <-> ptm_jax.models.bert."""

from ptm_jax.hub import convert
from ptm_jax.models import bert

_BLOCK_NAMES = {
    'query': 'attention.self.query', 'key': 'attention.self.key',
    'value': 'attention.self.value', 'out': 'attention.output.dense',
    'ln_attention': 'attention.output.LayerNorm', 'fc_in': 'intermediate.dense',
    'fc_out': 'output.dense', 'ln_mlp': 'output.LayerNorm',
}


def rules(config: bert.BertConfig, head: str | None) -> list[convert.Rule]:
  p = 'bert.' if head is not None else ''  # transformers' base_model_prefix
  base = ('params', 'bert')
  out = [convert.embedding(f'{p}embeddings.word_embeddings', base + ('word_embeddings',)),
         convert.embedding(f'{p}embeddings.position_embeddings', base + ('position_embeddings',)),
         convert.embedding(f'{p}embeddings.token_type_embeddings',
                           base + ('token_type_embeddings',))]
  out += convert.layer_norm(f'{p}embeddings.LayerNorm', base + ('embeddings_ln',))
  for i in range(config.num_layers):
    out += convert.attention_block(f'{p}encoder.layer.{i}', base + (f'layer_{i}',), _BLOCK_NAMES)
  if head in bert._HEADS_WITH_POOLER:
    out += convert.linear(f'{p}pooler.dense', base + ('pooler',))
  if head in ('pretraining', 'mlm'):
    out += convert.linear('cls.predictions.transform.dense', ('params', 'mlm_transform'))
    out += convert.layer_norm('cls.predictions.transform.LayerNorm', ('params', 'mlm_ln'))
    out.append(convert.same('cls.predictions.bias', ('params', 'mlm_bias')))
  if head in ('pretraining', 'nsp'):
    out += convert.linear('cls.seq_relationship', ('params', 'nsp'))
  if head in ('sequence_classification', 'token_classification'):
    out += convert.linear('classifier', ('params', 'classifier'))
  return out


FAMILY = convert.Family(
    name='bert',
    model_types=('bert',),
    config_cls=bert.BertConfig,
    architectures={
        'BertModel': None, 'BertForPreTraining': 'pretraining', 'BertForMaskedLM': 'mlm',
        'BertForNextSentencePrediction': 'nsp',
        'BertForSequenceClassification': 'sequence_classification',
        'BertForTokenClassification': 'token_classification'},
    make_module=lambda config, **kw: bert.Bert(config, **kw),
    rules=rules,
    prefix='bert.',
    # The decoder is tied to the word embeddings; its bias is cls.predictions.bias.
    tied_keys=(r'^cls\.predictions\.decoder\.(weight|bias)$',),
)
