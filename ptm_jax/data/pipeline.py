"""From `config.data` to global batches laid out on the mesh: the one input pipeline.

    config.data --open_split--> source (random access) --example transform--> examples
        --global order (shuffle per epoch, repeat)--> this host's rows of each global batch
        --batch--> numpy (b, ...) --make_array_from_process_local_data--> jax.Array (B, ...)

Why grain over tf.data: every source here is random access (TFDS ArrayRecord files through
`tfds.data_source`, local files, arrays), so grain's index-based datasets make the order a pure
function of (seed, step). The iterator's state is one integer, saved with the training checkpoint;
a resumed run sees exactly the batches an uninterrupted one would. Transforms are plain numpy
and PIL, easy to read and debug, and no TensorFlow graph runs at train time.

Hosts: the global order does not depend on how many processes read it. Global batch g is
examples g*B .. g*B+B-1 of the global order; each process reads only the rows that its devices
hold under the batch sharding. So one process and two processes see the same global batches,
and no example is read twice. (Streamed LM corpora too large to tokenise in memory are the
exception: each host packs its own share of documents; see `_streamed_lm`.)

Batch keys by task (int32 unless noted; -100 marks an ignored label, transformers' convention):
  image_classification  image float32 (B, H, W, C), label (B,)
  text_classification   input_ids, attention_mask, token_type_ids (B, T), label (B,)
  causal_lm             input_ids, labels (B, T)           labels = input_ids shifted left
  mlm_nsp               input_ids, attention_mask, token_type_ids, mlm_labels (B, T),
                        next_sentence_label (B,)
  image_text            image float32 (B, H, W, C), input_ids, attention_mask (B, T)
Eval batches also carry valid (B,) int32: 0 on the padding that fills the last batch.
"""

import dataclasses
import functools
import os
import re
import sys
from typing import Any, Callable, Sequence

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ptm_jax.data import embedded, image, sources, text
from ptm_jax.data.sources import DataError

TASKS = ('image_classification', 'text_classification', 'causal_lm', 'mlm_nsp', 'image_text')
IGNORE = -100
# The fewest examples in one shuffled pass over an examples_per_class subset (see open_split).
_MIN_SHUFFLED_PASS = 1024
_LABEL_KEYS = ('label', 'labels', 'mlm_labels', 'next_sentence_label')
_INTEGER = re.compile(r'\s*[+-]?\d+\s*')
# Batch axis of every batch array: the data-parallel axes of ptm_jax.partitioning.MESH_AXES.
BATCH_AXES = ('data', 'fsdp')
# Feature names of well-known TFDS datasets: (image or text key, text pair key, label key).
_TFDS_KEYS = {
    'glue/cola': ('sentence', None, 'label'), 'glue/sst2': ('sentence', None, 'label'),
    'glue/mrpc': ('sentence1', 'sentence2', 'label'), 'glue/qqp': ('question1', 'question2',
                                                                   'label'),
    'glue/stsb': ('sentence1', 'sentence2', 'label'), 'glue/mnli': ('premise', 'hypothesis',
                                                                    'label'),
    'glue/qnli': ('question', 'sentence', 'label'), 'glue/rte': ('sentence1', 'sentence2',
                                                                 'label'),
    'glue/wnli': ('sentence1', 'sentence2', 'label'),
    'coco_captions': ('image', 'captions', None),
}


def default_config() -> ml_collections.ConfigDict:
  """Every `config.data` key with its default; experiment configs override what they need."""
  c = ml_collections.ConfigDict()
  c.task = 'image_classification'   # one of TASKS
  # Where the data comes from: exactly one of name (TFDS or embedded), text_file, image_folder,
  # table_file. Paths may contain '{split}', replaced by the split name.
  c.name = ''                # TFDS name ('cifar10', 'glue/sst2', 'lm1b') or 'digits' (embedded)
  c.text_file = ''           # a text file or a folder of .txt files (causal_lm, mlm_nsp)
  c.image_folder = ''        # ROOT with ROOT/SPLIT/LABEL/*.png|jpg
  c.table_file = ''          # JSONL or CSV with text (and label) columns, or image paths + text
  c.train_split = 'train'
  c.eval_split = 'test'
  c.val_fraction = 0.1       # text_file without '{split}': the last fraction is 'val'/'test'
  c.data_dir = ''            # TFDS data_dir ('' = TFDS's default)
  c.manual_dir = ''          # TFDS manual_dir, for datasets downloaded by hand (imagenet2012)
  c.download = False         # let TFDS download and prepare (needs network)
  c.classes = ()             # digits: keep these classes, relabelled from 0
  # Classification training with few labels: keep this many examples of each class, a subset
  # fixed by the seed (0 = all). Only loaders built with train=True; evaluation sees everything.
  c.examples_per_class = 0
  # Features.
  c.image_key = 'image'
  c.text_key = 'text'
  c.text_pair_key = ''
  c.label_key = 'label'
  c.num_classes = 0          # 0: from the dataset (TFDS ClassLabel, image folders, digits)
  # Images.
  c.image_size = 224
  c.channels = 3
  c.normalization = ''       # '' = by model family; else one of image.NORMALIZATION
  c.augment = 'basic'        # 'basic' (random resized crop + flip), 'strong', 'none'
  c.crop_fraction = 0.875    # eval: resize to image_size / crop_fraction, then central crop
  c.interpolation = 'bilinear'
  # Text.
  c.tokenizer = ''           # '' = files beside init.from_pretrained; 'char', 'byte', or a folder
  c.seq_len = 128
  c.mask_prob = 0.15
  c.nsp = True
  # Loader.
  c.num_threads = 2          # grain read threads (per host)
  c.prefetch = 8             # examples buffered per thread
  return c


def merged_config(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`data` over the defaults, refusing keys the pipeline does not know (typos fail loudly)."""
  out = default_config()
  unknown = sorted(set(data.keys()) - set(out.keys()))
  if unknown:
    raise ValueError(f'Unknown config.data key(s) {unknown}; known keys: {sorted(out.keys())}.')
  out.update(data)
  if out.task not in TASKS:
    raise ValueError(f'config.data.task {out.task!r} is not one of {TASKS}.')
  return out


@dataclasses.dataclass
class DatasetInfo:
  """What the model and the trainer need to know about the data."""
  task: str
  split: str
  num_examples: int | None          # None for streamed corpora
  num_classes: int | None = None
  class_names: Sequence[str] | None = None
  tokenizer: Any = None             # a text.TextTokenizer for text tasks
  vocab_size: int | None = None


# ------------------------------------------------------------------------------------------------
# Sources


def _path(template: str, split: str) -> str:
  return template.replace('{split}', split)


def _which_source(data: ml_collections.ConfigDict) -> str:
  given = [k for k in ('name', 'text_file', 'image_folder', 'table_file') if data[k]]
  if len(given) != 1:
    raise ValueError('Set exactly one of config.data.name (TFDS or embedded), text_file, '
                     f'image_folder, table_file; got {given or "none"}.')
  return given[0]


def _open_raw(data: ml_collections.ConfigDict, split: str):
  """(random-access source, num_classes or None, class_names or None) of one split."""
  kind = _which_source(data)
  if kind == 'name' and data.name in embedded.EMBEDDED:
    classes = tuple(data.classes) or None
    src = embedded.EMBEDDED[data.name](split, classes=classes)
    return src, len(classes) if classes else 10, None
  if kind == 'name':
    src = sources.tfds_source(data.name, split, data_dir=data.data_dir or None,
                              manual_dir=data.manual_dir or None, download=data.download)
    num_classes = None
    if data.task in ('image_classification', 'text_classification'):
      num_classes = sources.tfds_num_classes(data.name, _keys(data)[2], data.data_dir or None)
    return src, num_classes, None
  if kind == 'image_folder':
    src = sources.ImageFolderSource(data.image_folder, split)
    return src, len(src.class_names), src.class_names
  if kind == 'table_file':
    key, pair_key, label_key = _keys(data)
    columns = [key] + ([pair_key] if pair_key else []) + ([label_key] if label_key else [])
    src = sources.read_table(_path(data.table_file, split), columns)
    names = None
    labels = src.arrays[label_key] if label_key else None
    if labels is not None and labels.dtype == object:
      if all(isinstance(v, str) and _INTEGER.fullmatch(v) for v in labels):
        # CSV cells are strings: integer labels are ids, not names ('10' sorts before '2').
        src.arrays[label_key] = np.array([int(v) for v in labels], np.int64)
      else:
        names = _table_label_names(data, split, label_key, labels)
        index = {n: i for i, n in enumerate(names)}
        src.arrays[label_key] = np.array([index[n] for n in labels], np.int64)
    return src, len(names) if names else None, names
  raise ValueError(f'config.data.{kind} is a {data.task} source only through text tasks.')


def _table_label_names(data, split: str, label_key: str, labels) -> list:
  """The class names of string labels: the sorted label names of the training split's table, so
  that an id means the same class in every split (a test file that lacks a class or holds only
  some would otherwise number them differently); of this table when there is no other."""
  names = sorted(set(labels))
  train_path = _path(data.table_file, data.train_split)
  if '{split}' not in data.table_file or split == data.train_split \
      or not os.path.isfile(train_path):
    return names
  train_names = sorted(set(sources.read_table(train_path, [label_key]).arrays[label_key]))
  unknown = sorted(set(names) - set(train_names))
  if unknown:
    raise DataError(f'{_path(data.table_file, split)}: label(s) {unknown[:20]} do not occur in '
                    f'the training table {train_path}, whose labels {train_names[:20]} number '
                    'the classes; fix the labels, or give numbers as labels.')
  return train_names


def _keys(data) -> tuple[str, str | None, str | None]:
  """(main feature key, second text key, label key) for this dataset and task.

  image_text: (image key, caption key, None). Known TFDS datasets use their own feature names;
  everything else takes config.data's *_key settings.
  """
  if data.name in _TFDS_KEYS:
    return _TFDS_KEYS[data.name]
  if data.task == 'image_text':
    return data.image_key, data.text_key, None
  if data.task == 'image_classification':
    return data.image_key, None, data.label_key
  if data.task == 'text_classification':
    return data.text_key, data.text_pair_key or None, data.label_key
  return data.text_key, None, None


# ------------------------------------------------------------------------------------------------
# Tokenizers and text corpora


def corpus_split(data: ml_collections.ConfigDict, split: str) -> list[str]:
  """The documents of one split of a local text corpus.

  A path with '{split}' names one file or folder per split. Otherwise the corpus is cut at
  character (1 - val_fraction) * N: the train split is the text before, every other split the
  text after (nanoGPT's shakespeare_char split).
  """
  if '{split}' in data.text_file:
    return sources.read_text(_path(data.text_file, split))
  docs = sources.read_text(data.text_file)
  joined = '\n\n'.join(docs) if len(docs) > 1 else docs[0]
  if not 0.0 < data.val_fraction < 1.0:
    raise ValueError(f'config.data.val_fraction must be in (0, 1), not {data.val_fraction}.')
  cut = int(len(joined) * (1.0 - data.val_fraction))
  part = joined[:cut] if split == data.train_split else joined[cut:]
  return [part]


def make_tokenizer(data: ml_collections.ConfigDict, checkpoint: str = ''):
  """The tokenizer of a text task: config.data.tokenizer, else the checkpoint's own files.

  'char' builds its vocabulary from the training text (the whole text file, as nanoGPT does, so
  the validation characters are in it).
  """
  data = merged_config(data)
  if data.task == 'image_classification':
    return None
  corpus = None
  if data.tokenizer == 'char':
    if not data.text_file:
      raise ValueError("config.data.tokenizer='char' builds its vocabulary from "
                       'config.data.text_file; set that, or use tokenizer=byte.')
    if '{split}' in data.text_file:
      corpus = ''.join(sources.read_text(_path(data.text_file, data.train_split)))
    else:  # The text corpus_split cuts: several documents are joined with blank lines.
      corpus = '\n\n'.join(sources.read_text(data.text_file))
  return text.get_tokenizer(data.tokenizer, checkpoint=checkpoint or None, text=corpus)


# ------------------------------------------------------------------------------------------------
# Example transforms: raw example (+ rng) -> dict of fixed-shape numpy arrays.


def _check_label(label, num_classes: int | None, where: str) -> np.int32:
  if isinstance(label, (float, np.floating)) and not float(label).is_integer():
    # int() would floor it: a regression target (glue/stsb's 0..5 similarity) is not a class.
    raise DataError(f'{where}: label {label} is not a class id; classification needs integer '
                    'labels (regression targets such as glue/stsb scores are not supported).')
  label = int(label)
  if num_classes is not None and not 0 <= label < num_classes:
    raise DataError(f'{where}: label {label} is outside [0, {num_classes}); set '
                    'config.data.num_classes to the number of classes of this dataset, or fix '
                    'the label.')
  return np.int32(label)


def _image_fn(data, family: str, train: bool):
  # No family (a model built from scratch with no preference): ImageNet statistics.
  norm = data.normalization or (image.normalization_for_family(family) if family else 'imagenet')
  return functools.partial(image.preprocess, image_size=data.image_size, train=train,
                           normalization=norm, augment=data.augment,
                           crop_fraction=data.crop_fraction, channels=data.channels,
                           method=data.interpolation)


def _encode_text(tokenizer, first: str, second: str | None, seq_len: int) -> dict[str, np.ndarray]:
  """[CLS] A [SEP] (B [SEP]) (or the tokenizer's template), truncated longest-first to seq_len."""
  ids, type_ids = tokenizer.encode_special(text.as_text(first), None if second is None
                                           else text.as_text(second), max_length=seq_len)
  input_ids, mask = text.pad_or_truncate(ids, seq_len, tokenizer.pad_id or 0)
  types, _ = text.pad_or_truncate(type_ids, seq_len, 0)
  return {'input_ids': input_ids, 'attention_mask': mask, 'token_type_ids': types}


def _classification_transform(data, info: DatasetInfo, family: str, train: bool, where: str):
  key, pair_key, label_key = _keys(data)
  if data.task == 'image_classification':
    preprocess = _image_fn(data, family, train)

    def image_example(index, example, rng):
      img = preprocess(example[key], rng=rng, name=f'{where} example {index}')
      return {'image': img, 'label': _check_label(example[label_key], info.num_classes,
                                                  f'{where} example {index}')}
    return image_example

  def text_example(index, example, rng):
    del rng
    out = _encode_text(info.tokenizer, example[key], example[pair_key] if pair_key else None,
                       data.seq_len)
    out['label'] = _check_label(example[label_key], info.num_classes, f'{where} example {index}')
    return out
  return text_example


def _image_text_transform(data, info: DatasetInfo, family: str, train: bool, where: str):
  preprocess = _image_fn(data, family or 'clip', train)
  key, text_key, _ = _keys(data)

  def example_fn(index, example, rng):
    captions = example[text_key]
    if isinstance(captions, dict):  # TFDS coco_captions: {'text': (n,), 'id': (n,)}
      captions = captions['text']
    if isinstance(captions, (str, bytes)):
      captions = [captions]
    if len(captions) == 0:
      raise DataError(f'{where} example {index} has no caption.')
    # Training sees a random caption of the image each epoch; eval always the first.
    caption = captions[int(rng.integers(len(captions)))] if train else captions[0]
    image_value = example[key]
    if isinstance(image_value, (str, bytes)) and data.table_file:
      # Relative to this split's table: the folder part of the path may hold '{split}' too.
      image_value = os.path.join(os.path.dirname(_path(data.table_file, info.split)),
                                 text.as_text(image_value))
    out = _encode_text(info.tokenizer, caption, None, data.seq_len)
    del out['token_type_ids']
    out['image'] = preprocess(image_value, rng=rng, name=f'{where} example {index}')
    return out
  return example_fn


# ------------------------------------------------------------------------------------------------
# Per-split datasets: a global, per-example grain.MapDataset.


@dataclasses.dataclass
class SplitData:
  """One split as a global sequence of processed examples (or a per-host stream)."""
  examples: grain.MapDataset | None     # global order, one processed example per index
  info: DatasetInfo
  stream: Callable[[int, int], grain.IterDataset] | None = None  # (host, hosts) -> examples


def _random_access_lm(tokens: np.ndarray, seq_len: int, train: bool, seed: int,
                      where: str) -> grain.MapDataset:
  """Windows of seq_len + 1 tokens of one long token array.

  Train: each example starts at a uniformly random offset (nanoGPT's sampling), drawn from the
  example's own seeded rng, so the stream is still a function of (seed, index); an "epoch" is
  len(tokens) // seq_len examples. Eval: consecutive non-overlapping windows, every token after
  the first predicted once; the last window is cut short by the end of the text and padded (input
  0, label -100).
  """
  n = len(tokens)
  if n < seq_len + 1:
    raise DataError(f'{where} has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; lower '
                    'config.data.seq_len or give more text.')
  if train:
    def window(_, rng):
      start = int(rng.integers(0, n - seq_len))
      return text.lm_example(tokens[start:start + seq_len + 1])
    return grain.MapDataset.range(n // seq_len).seed(seed).repeat().random_map(window)
  count = -(-(n - 1) // seq_len)

  def eval_window(i):
    # The last window holds at least 2 tokens: it starts before token n - 1.
    out = text.lm_example(tokens[i * seq_len:i * seq_len + seq_len + 1])
    pad = seq_len - len(out['labels'])
    return {'input_ids': np.pad(out['input_ids'], (0, pad)),
            'labels': np.pad(out['labels'], (0, pad), constant_values=IGNORE)}
  return grain.MapDataset.range(count).map(eval_window)


class _TokenizedDocuments(Sequence):
  """Documents of a source, split into sentences and tokenised on access (NSP's random B)."""

  def __init__(self, source, key: str, tokenizer):
    self.source, self.key, self.tokenizer = source, key, tokenizer

  def __len__(self):
    return len(self.source)

  @functools.lru_cache(maxsize=4096)
  def __getitem__(self, index):
    sentences = text.split_sentences(text.as_text(self.source[index][self.key]))
    return [self.tokenizer.encode(s) for s in sentences]


class _ListSource:
  """A list of texts as a source of {'text': str}."""

  def __init__(self, texts: Sequence[str]):
    self.texts = list(texts)

  def __len__(self):
    return len(self.texts)

  def __getitem__(self, index):
    return {'text': self.texts[index]}


def _paragraphs(documents: Sequence[str]) -> list[str]:
  """A single text file's documents are its paragraphs (blank-line separated)."""
  out = []
  for doc in documents:
    out.extend(p for p in (s.strip() for s in doc.split('\n\n')) if p)
  return out


def open_split(data: ml_collections.ConfigDict, split: str, *, train: bool, seed: int,
               tokenizer=None, family: str = '', source=None) -> SplitData:
  """One split of `config.data` as processed examples in their global order.

  Args:
    data: config.data (missing keys take `default_config()`'s values).
    split: the split name.
    train: shuffle (reshuffled every epoch), repeat forever and augment; else one pass in order.
    seed: the data seed; the same seed gives the same examples in the same order.
    tokenizer: a text.TextTokenizer for text tasks (see make_tokenizer).
    family: the model family ('resnet', 'vit', 'clip' ...), which picks the image normalisation.
    source: a random-access source to use instead of the one config.data names (e.g.
      sources.ArraySource over numpy arrays in memory) for the classification and image_text
      tasks; config.data.num_classes then gives the number of classes.
  """
  data = merged_config(data)
  if source is not None:
    data.name = data.name or 'arrays'  # names the source in errors; _open_raw is not called
  where = f'{data.name or data.text_file or data.image_folder or data.table_file} split {split!r}'
  if data.task != 'image_classification' and tokenizer is None:
    raise ValueError(f'config.data.task {data.task!r} needs a tokenizer; build one with '
                     'make_tokenizer(config.data, checkpoint).')
  info = DatasetInfo(task=data.task, split=split, num_examples=None, tokenizer=tokenizer,
                     vocab_size=getattr(tokenizer, 'vocab_size', None))

  if data.task == 'causal_lm':
    if data.text_file:
      docs = corpus_split(data, split)
      tokens = _concat_tokens(docs, tokenizer)
      examples = _random_access_lm(tokens, data.seq_len, train, seed, where)
      info.num_examples = len(tokens) // data.seq_len if train else len(examples)
      return SplitData(examples, info)
    src, _, _ = _open_raw(data, split)
    key = _keys(data)[0]
    return SplitData(None, info, stream=functools.partial(
        _streamed_lm, src, key, tokenizer, data.seq_len, train, seed))

  if data.task == 'mlm_nsp':
    if data.text_file:
      docs = corpus_split(data, split)
      src = _ListSource(docs if len(docs) > 1 else _paragraphs(docs))
      key = 'text'
    else:
      src, _, _ = _open_raw(data, split)
      key = _keys(data)[0]
    documents = _TokenizedDocuments(src, key, tokenizer)
    for name in ('cls_id', 'sep_id', 'mask_id'):
      if getattr(tokenizer, name, None) is None:
        which = data.tokenizer or 'the checkpoint tokenizer'
        raise ValueError(f'mlm_nsp needs a tokenizer with {name[:-3].upper()} tokens (a BERT '
                         f'WordPiece vocabulary); {which!r} has none.')

    def mlm_example(index, rng):
      return text.mlm_nsp_example(
          documents, index, rng, max_len=data.seq_len, cls_id=tokenizer.cls_id,
          sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id or 0, mask_id=tokenizer.mask_id,
          vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids,
          mask_prob=data.mask_prob, nsp=data.nsp)
    ds = grain.MapDataset.range(len(documents)).seed(seed)
    ds = ds.shuffle().repeat() if train else ds
    info.num_examples = len(documents)
    return SplitData(ds.random_map(mlm_example), info)

  if source is not None:
    src, num_classes, class_names = source, None, None
  else:
    src, num_classes, class_names = _open_raw(data, split)
  if data.examples_per_class and train:
    if data.task not in ('image_classification', 'text_classification'):
      raise ValueError(f'config.data.examples_per_class needs labels: it applies to the '
                       f'classification tasks, not {data.task!r}; set it to 0.')
    keep = per_class_subset(_labels_of(src, _keys(data)[2]), data.examples_per_class, seed)
    info.num_examples = len(keep)
    # grain's index shuffle costs about 15 ms / n per example of an n-example pass (1.5 ms at
    # n = 10: more than a small model's whole step), so a small subset is shuffled as copies of
    # itself, at least _MIN_SHUFFLED_PASS examples; every pass still holds each example equally
    # often.
    src = IndexedSource(src, np.tile(keep, -(-_MIN_SHUFFLED_PASS // len(keep))))
  else:
    info.num_examples = len(src)
  info.num_classes = data.num_classes or num_classes
  info.class_names = class_names
  if data.task in ('image_classification', 'text_classification') and not info.num_classes:
    raise ValueError(f'{where}: the number of classes is unknown; set config.data.num_classes.')
  make = (_image_text_transform if data.task == 'image_text' else _classification_transform)
  transform = make(data, info, family, train, where)
  ds = grain.MapDataset.source(src).map_with_index(lambda i, ex: (i, ex)).seed(seed)
  ds = ds.shuffle().repeat() if train else ds
  return SplitData(ds.random_map(lambda ie, rng: transform(ie[0], ie[1], rng)), info)


def per_class_subset(labels: np.ndarray, examples_per_class: int, seed: int) -> np.ndarray:
  """Sorted indices of `examples_per_class` examples of each label (all of a smaller class).

  Each class takes the first k of a seeded permutation of its examples, so with one seed the
  subset of k is inside the subset of any larger k: a bigger budget only adds labels.
  labels: (N,) ints. Returns int64 (M,), M <= examples_per_class x the number of classes.
  """
  if examples_per_class < 0:
    raise ValueError(f'config.data.examples_per_class must be >= 0 (0 = all), not '
                     f'{examples_per_class}.')
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  keep = [rng.permutation(np.flatnonzero(labels == c))[:examples_per_class]
          for c in np.unique(labels)]
  return np.sort(np.concatenate(keep)).astype(np.int64)


def _labels_of(src, label_key: str) -> np.ndarray:
  """Every label of a source: from its arrays when it has them, else read example by example."""
  if isinstance(src, sources.ArraySource):
    return np.asarray(src.arrays[label_key])
  if isinstance(src, sources.ImageFolderSource):
    return np.asarray(src.labels)
  return np.asarray([src[i][label_key] for i in range(len(src))])


class IndexedSource:
  """Examples `indices` of a random-access source, as a source (example i is source[indices[i]])."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index):
    return self.source[int(self.indices[index])]


def _concat_tokens(docs: Sequence[str], tokenizer) -> np.ndarray:
  """Documents joined into one token array, an end-of-text token between them where one exists."""
  parts = []
  for i, doc in enumerate(docs):
    if i and tokenizer.eos_id is not None:
      parts.append(np.array([tokenizer.eos_id], np.int32))
    parts.append(np.asarray(tokenizer.encode(doc), np.int32))
  return np.concatenate(parts)


def _streamed_lm(src, key: str, tokenizer, seq_len: int, train: bool, seed: int,
                 host: int, hosts: int) -> grain.IterDataset:
  """A document corpus (TFDS lm1b, wikipedia ...) tokenised and packed as it streams.

  Each host takes every hosts-th document, shuffles its share per epoch, tokenises, and packs
  documents (end-of-text between them) into rows of seq_len + 1 tokens with grain's
  ConcatThenSplit. The stream depends on the number of hosts, unlike the random-access tasks;
  resume is still exact (grain checkpoints the packer's buffer).
  """
  ds = grain.MapDataset.source(src)[host::hosts].seed(seed)
  if train:
    ds = ds.shuffle().repeat()
  eos = tokenizer.eos_id

  def tokenize(example):
    ids = np.asarray(tokenizer.encode(text.as_text(example[key])), np.int32)
    if eos is not None:
      ids = np.concatenate([ids, np.array([eos], np.int32)])
    return {'tokens': ids, 'real': np.ones(len(ids), np.int32)}

  def lm_row(row):
    # The packer zero-fills the last row of a finite stream (an eval pass): 'real' is 0 there,
    # and those positions must not be scored as predictions of token id 0.
    out = text.lm_example(row['tokens'])
    out['labels'] = np.where(row['real'][1:] != 0, out['labels'], IGNORE).astype(np.int32)
    return out

  packed = grain.experimental.ConcatThenSplitIterDataset(
      ds.map(tokenize).to_iter_dataset(),
      length_struct={'tokens': seq_len + 1, 'real': seq_len + 1})
  return packed.map(lm_row)


# ------------------------------------------------------------------------------------------------
# Loader: global batches, this host's rows, jax.Arrays on the mesh.


def data_parallel_size(mesh: Mesh | None) -> int:
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch axis over the data-parallel mesh axes, everything else replicated."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def host_rows(global_batch_size: int, mesh: Mesh | None, process_index: int,
              process_count: int) -> np.ndarray:
  """The rows of each global batch that process `process_index` reads.

  With a mesh and the real process layout, the rows are those that this process's devices hold
  under the batch sharding (so make_array_from_process_local_data can place them). Otherwise
  (one process, or simulated hosts in tests) process p reads the p-th contiguous block.
  """
  if mesh is not None and process_count == jax.process_count() > 1 \
      and process_index == jax.process_index():
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = sorted({r for idx in index_map.values()
                   for r in range(*idx[0].indices(global_batch_size))})
    return np.asarray(rows, np.int64)
  per_host = global_batch_size // process_count
  return np.arange(process_index * per_host, (process_index + 1) * per_host, dtype=np.int64)


def check_batch_size(global_batch_size: int, mesh: Mesh | None, process_count: int):
  dp = data_parallel_size(mesh)
  if global_batch_size <= 0:
    raise ValueError(f'config.batch_size must be positive, not {global_batch_size}.')
  if global_batch_size % dp:
    raise ValueError(f'config.batch_size {global_batch_size} is not divisible by the '
                     f'data-parallel size {dp} (mesh data x fsdp = '
                     f'{dict((a, mesh.shape[a]) for a in BATCH_AXES if a in mesh.shape)}); '
                     f'use a multiple of {dp}.')
  if global_batch_size % process_count:
    raise ValueError(f'config.batch_size {global_batch_size} is not divisible by the '
                     f'{process_count} processes.')


def _padding_like(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  pad = {k: np.zeros_like(v) for k, v in example.items()}
  for k in _LABEL_KEYS:
    if k in pad:
      pad[k] = np.full_like(pad[k], IGNORE)
  return pad


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """A batch of n <= size rows -> size rows: padding rows (labels -100) after the n; adds
  'valid' (size,) int32, 1 on the n real rows."""
  n = len(next(iter(batch.values())))
  pad = _padding_like({k: v[:1] for k, v in batch.items()})
  out = {k: np.concatenate([v, np.repeat(pad[k], size - n, axis=0)]) for k, v in batch.items()}
  out['valid'] = (np.arange(size) < n).astype(np.int32)
  return out


class Loader:
  """Global batches of one split, for this process, with a checkpointable position.

  Iterating gives dicts of jax.Arrays (B, ...) sharded over the mesh's data axes (numpy arrays of
  this host's rows when no mesh is given). `get_state()` is a small JSON-able dict for the
  training checkpoint; `set_state()` puts the loader back at that batch.

  Train loaders repeat forever. Eval loaders make one pass of `num_batches` batches; the last one
  is filled with padding marked valid=0 (labels -100), the same count on every host.
  """

  def __init__(self, split_data: SplitData, *, global_batch_size: int, train: bool,
               mesh: Mesh | None = None, process_index: int | None = None,
               process_count: int | None = None, num_threads: int = 2, prefetch: int = 8):
    self.info = split_data.info
    self.mesh = mesh
    self.train = train
    self.global_batch_size = global_batch_size
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    check_batch_size(global_batch_size, mesh, self.process_count)
    rows = host_rows(global_batch_size, mesh, self.process_index, self.process_count)
    self.local_batch_size = len(rows)
    self.num_batches = None

    if split_data.examples is not None:
      examples = split_data.examples
      if not train:
        n = len(examples)
        self.num_batches = -(-n // global_batch_size)
        examples = _pad_to(examples, self.num_batches * global_batch_size)
      # Local example k is row rows[k % b] of global batch k // b.
      b, big_b = self.local_batch_size, global_batch_size
      length = self.num_batches * b if self.num_batches is not None else sys.maxsize // big_b
      local = grain.MapDataset.range(length).map(
          lambda k: examples[(k // b) * big_b + int(rows[k % b])])
      batched = local.batch(b, drop_remainder=True).to_iter_dataset(
          grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    else:
      # Eval on a streamed corpus is one pass over this host's share, until it runs out; bound
      # it with the trainer's eval_steps on several hosts, whose shares may differ by a batch.
      # Its last, partial batch is padded (valid=0, labels -100) rather than dropped.
      stream = split_data.stream(self.process_index, self.process_count)
      if train:
        batched = stream.batch(self.local_batch_size, drop_remainder=True)
      else:
        batched = stream.batch(self.local_batch_size, drop_remainder=False).map(
            functools.partial(_pad_batch, size=self.local_batch_size))
    self._dataset = batched
    self._iterator = iter(batched)
    self._sharding = batch_sharding(mesh) if mesh is not None else None
    self._step = 0

  def __iter__(self):
    return self

  def __len__(self):
    if self.num_batches is None:
      raise TypeError('A train loader repeats forever; it has no length.')
    return self.num_batches

  def __next__(self) -> dict[str, Any]:
    if self.num_batches is not None and self._step >= self.num_batches:
      raise StopIteration
    local = next(self._iterator)
    self._step += 1
    if self._sharding is None:
      return local
    return {k: jax.make_array_from_process_local_data(
        self._sharding, v, (self.global_batch_size,) + v.shape[1:]) for k, v in local.items()}

  def reset(self):
    """Back to the first batch (an eval loader before each evaluation)."""
    self._iterator = iter(self._dataset)
    self._step = 0

  def get_state(self) -> dict[str, Any]:
    return {'grain': self._iterator.get_state(), 'step': self._step,
            'global_batch_size': self.global_batch_size, 'process_count': self.process_count}

  def set_state(self, state: dict[str, Any]):
    # numpy or JAX scalars (a state restored as a pytree of arrays rather than from JSON) become
    # Python numbers: grain resumed at the wrong index when handed 0-d arrays.
    state = jax.tree.map(lambda x: x.item() if hasattr(x, 'item') and np.ndim(x) == 0 else x,
                         state)
    for key in ('global_batch_size', 'process_count'):
      if state.get(key) != getattr(self, key):
        raise ValueError(f'The saved data-iterator state has {key} {state.get(key)} but this run '
                         f'has {getattr(self, key)}; the saved position does not map onto this '
                         'run. Resume with the same batch size and process count, or start the '
                         'data afresh.')
    self._iterator.set_state(state['grain'])
    self._step = state['step']


def _pad_to(examples: grain.MapDataset, length: int) -> grain.MapDataset:
  """Examples, then padding copies (valid=0, labels -100) up to `length`; adds 'valid'."""
  n = len(examples)
  if n == 0:
    raise DataError('The evaluation split is empty.')

  def get(i):
    if i < n:
      return dict(examples[i], valid=np.int32(1))
    return dict(_padding_like(examples[0]), valid=np.int32(0))
  return grain.MapDataset.range(length).map(get)


def make_loader(config: ml_collections.ConfigDict, split: str, *, train: bool,
                mesh: Mesh | None = None, tokenizer=None, family: str = '',
                process_index: int | None = None, process_count: int | None = None,
                source=None) -> Loader:
  """config (config.data, config.batch_size, config.seed) -> a Loader of one split.

  Build the tokenizer once with `make_tokenizer` and pass it to the train and eval loaders.
  `source` replaces the source config.data names (see open_split).
  """
  data = merged_config(config.data)
  split_data = open_split(data, split, train=train, seed=int(config.get('seed', 0)),
                          tokenizer=tokenizer, family=family, source=source)
  return Loader(split_data, global_batch_size=int(config.batch_size), train=train, mesh=mesh,
                process_index=process_index, process_count=process_count,
                num_threads=data.num_threads, prefetch=data.prefetch)
