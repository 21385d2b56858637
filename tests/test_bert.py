"""BERT: parity with transformers for every head, both directions of conversion."""

import jax
import numpy as np
import pytest
import torch
import transformers

import ptm_jax
from tests import parity

HEADS = {
    None: transformers.BertModel,
    'pretraining': transformers.BertForPreTraining,
    'mlm': transformers.BertForMaskedLM,
    'nsp': transformers.BertForNextSentencePrediction,
    'sequence_classification': transformers.BertForSequenceClassification,
    'token_classification': transformers.BertForTokenClassification,
}
FIELDS = {
    None: ('last_hidden_state', 'pooler_output'),
    'pretraining': ('prediction_logits', 'seq_relationship_logits'),
}


def small_config():
  # Deliberately non-default: odd widths, 3 token types, 3 labels.
  return transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=40, type_vocab_size=3, num_labels=3)


def torch_outputs(model, ids, mask, types):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types))


@pytest.mark.parametrize('head', list(HEADS), ids=str)
def test_parity_both_directions(head, tmp_path):
  torch.manual_seed(0)
  reference = parity.perturb(HEADS[head](small_config()).eval())
  reference.save_pretrained(tmp_path / 'hf')
  ids, mask = parity.token_batch(99)
  types = (np.arange(ids.shape[1]) >= 5).astype(np.int64)[None].repeat(ids.shape[0], 0)
  expected = torch_outputs(reference, ids, mask, types)

  module, variables = ptm_jax.from_pretrained(str(tmp_path / 'hf'))
  assert module.head == head
  ours = module.apply(variables, input_ids=ids.astype(np.int32),
                      attention_mask=mask.astype(np.int32), token_type_ids=types.astype(np.int32))
  for field in FIELDS.get(head, ('logits',)):
    assert parity.max_abs_diff(getattr(ours, field),
                               getattr(expected, field)) <= parity.TOLERANCE, field

  ptm_jax.save_pretrained(module, variables, str(tmp_path / 'ours'))
  reloaded = HEADS[head].from_pretrained(tmp_path / 'ours').eval()
  parity.assert_same_weights(reloaded, reference)
  again = torch_outputs(reloaded, ids, mask, types)
  for field in FIELDS.get(head, ('logits',)):
    # The same weights (checked above) and config: the same outputs, bit for bit.
    assert parity.max_abs_diff(getattr(again, field).numpy(), getattr(expected, field)) == 0


def test_bad_input_gets_a_clear_error():
  from ptm_jax.models import bert
  module = bert.Bert(bert.BertConfig(vocab_size=99, hidden_size=16, num_layers=1, num_heads=2,
                                     intermediate_size=32, max_position_embeddings=16))
  variables = module.init(jax.random.key(0), **module.example_inputs(batch_size=3, length=10))
  ids = np.ones((3, 10), np.int32)
  with pytest.raises(ValueError, match=r'input_ids must be \(batch, length\).*input_ids\[None\]'):
    module.apply(variables, input_ids=ids[0])
  with pytest.raises(ValueError, match=r'attention_mask has shape \(1, 10\) but input_ids has '
                     r'\(3, 10\): give one 1/0 entry per token'):
    module.apply(variables, input_ids=ids, attention_mask=ids[:1])  # would broadcast
  with pytest.raises(ValueError, match=r'token_type_ids has shape \(3, 9\) but input_ids has '
                     r'\(3, 10\): give one segment id per token'):
    module.apply(variables, input_ids=ids, token_type_ids=ids[:, 1:])
  with pytest.raises(ValueError, match='input_ids has 17 positions but the position table holds '
                     '16'):
    module.apply(variables, input_ids=np.ones((1, 17), np.int32))
