"""Random-access data sources: TFDS, local files, in-memory arrays and the embedded digits.

A source is anything with `len(source)` and `source[i] -> dict of numpy values` (grain's
RandomAccessDataSource protocol). Random access is what makes the pipeline deterministic and
resumable: an example is named by its index, so a shuffled epoch is a permutation of indices and
the iterator's whole state is one integer.

Sources return raw features (uint8 images, str texts, int labels); decoding of image files happens
on access, tokenisation and augmentation happen later in `pipeline.py`.
"""

import csv
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')


class DataError(ValueError):
  """Bad or missing data; the message names the dataset, the split and the fix."""


class ArraySource:
  """Numpy arrays in memory as a source: example i is {key: array[i]}.

  Args:
    arrays: {feature name: array with a leading example axis}, all of the same length.
    name: how errors name this source.
  """

  def __init__(self, arrays: Mapping[str, Any], name: str = 'arrays'):
    if not arrays:
      raise DataError(f'{name}: no arrays given.')
    self.arrays = {k: v if isinstance(v, np.ndarray) and v.dtype != object else _as_array(v)
                   for k, v in arrays.items()}
    lengths = {k: len(v) for k, v in self.arrays.items()}
    if len(set(lengths.values())) != 1:
      raise DataError(f'{name}: arrays have different lengths {lengths}; every feature needs one '
                      'entry per example.')
    self.name = name
    self._len = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {k: v[index] for k, v in self.arrays.items()}

  def __repr__(self) -> str:
    return f'ArraySource({self.name}, {self._len} examples, keys={sorted(self.arrays)})'


def _as_array(values) -> np.ndarray:
  """A list of str stays an object array (numpy's fixed-width str arrays pad and copy)."""
  values = list(values)
  if values and isinstance(values[0], str):
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
  return np.asarray(values)


# ------------------------------------------------------------------------------------------------
# TFDS


def _split_name(split: str) -> str:
  """'train[:90%]' -> 'train'; TFDS's slicing syntax is allowed after the split name."""
  return re.split(r'[\[+]', split, maxsplit=1)[0].strip()


def tfds_source(name: str, split: str, *, data_dir: str | None = None,
                manual_dir: str | None = None, download: bool = False):
  """A TFDS dataset's split as a random-access source (ArrayRecord files, no TensorFlow graph).

  The dataset must be prepared in the array_record format; with `download=True` TFDS prepares it
  (needs network, and `manual_dir` for datasets such as imagenet2012 whose files you download by
  hand). Errors name the command that prepares the data.
  """
  import tensorflow_datasets as tfds  # Imported here: slow, and only TFDS sources need it.

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f'Unknown TFDS dataset {name!r}. Check the name (and config, e.g. '
                    "'glue/sst2') in the TFDS catalogue: https://www.tensorflow.org/datasets/"
                    f'catalog/overview. ({str(e).splitlines()[0]})') from None
  known = sorted(builder.info.splits.keys())
  if known and _split_name(split) not in known:
    raise DataError(f'TFDS dataset {name!r} has no split {split!r}; its splits are {known}.')
  prepare_kwargs = None
  if manual_dir:
    prepare_kwargs = {'download_config': tfds.download.DownloadConfig(manual_dir=manual_dir)}
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                            builder_kwargs={'file_format': 'array_record'},
                            download_and_prepare_kwargs=prepare_kwargs)
  except Exception as e:  # TFDS raises several types here; each is turned into the fix below.
    command = f'tfds build {name} --file_format=array_record'
    if data_dir:
      command += f' --data_dir={data_dir}'
    if manual_dir:
      command += f' --manual_dir={manual_dir}'
    where = data_dir or '~/tensorflow_datasets (or $TFDS_DATA_DIR)'
    if not download and not builder.is_prepared():
      raise DataError(f'TFDS dataset {name!r} is not prepared in {where}. Prepare it once with\n'
                      f'  {command}\nor set config.data.download=True to let TFDS fetch it '
                      '(datasets with manual downloads also need config.data.manual_dir).'
                      ) from e
    raise DataError(f'Could not open TFDS dataset {name!r} split {split!r} from {where}: {e}\n'
                    'ptm_jax reads TFDS through random access, which needs the array_record file '
                    f'format; re-prepare with\n  {command}') from e


def tfds_num_classes(name: str, label_key: str = 'label',
                     data_dir: str | None = None) -> int | None:
  """The number of classes of a TFDS dataset's ClassLabel feature, or None."""
  import tensorflow_datasets as tfds
  try:
    feature = tfds.builder(name, data_dir=data_dir).info.features[label_key]
  except (KeyError, TypeError):
    return None
  return getattr(feature, 'num_classes', None)


# ------------------------------------------------------------------------------------------------
# Local files


def read_text(path: str) -> list[str]:
  """A text file, or a folder of .txt files (sorted, recursive), as a list of documents.

  A file is one document; so is each file of a folder. Empty files are an error, not a silent
  zero-length corpus.
  """
  if os.path.isdir(path):
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.endswith('.txt'))
    if not files:
      raise DataError(f'Text folder {path} holds no .txt files.')
  elif os.path.isfile(path):
    files = [path]
  else:
    raise DataError(f'Text file {path} does not exist; set config.data.text_file to a text file '
                    'or a folder of .txt files.')
  documents = []
  for file in files:
    with open(file, encoding='utf-8') as f:
      text = f.read()
    if not text.strip():
      raise DataError(f'Text file {file} is empty; a language-model corpus needs text.')
    documents.append(text)
  return documents


class ImageFolderSource:
  """Images in ROOT/SPLIT/LABEL/*.png|jpg as a source of {'image': uint8 (H, W, C), 'label'}.

  Class names are the sorted sub-folder names of all splits under ROOT, so a label id means the
  same class in every split. Images are decoded when accessed.
  """

  def __init__(self, root: str, split: str):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      have = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) \
          if os.path.isdir(root) else None
      raise DataError(f'Image folder {root} has no split {split!r}'
                      + (f'; it has {have}.' if have is not None else ' (the folder does not '
                         'exist).') + ' The layout is ROOT/SPLIT/LABEL/*.png|jpg.')
    self.class_names = sorted({label for s in os.listdir(root)
                               if os.path.isdir(os.path.join(root, s))
                               for label in os.listdir(os.path.join(root, s))
                               if os.path.isdir(os.path.join(root, s, label))})
    index = {c: i for i, c in enumerate(self.class_names)}
    self.files, self.labels = [], []
    for label in sorted(os.listdir(split_dir)):
      folder = os.path.join(split_dir, label)
      if not os.path.isdir(folder):
        continue
      for f in sorted(os.listdir(folder)):
        if f.lower().endswith(IMAGE_SUFFIXES):
          self.files.append(os.path.join(folder, f))
          self.labels.append(index[label])
    if not self.files:
      raise DataError(f'Image folder {split_dir} holds no images ({", ".join(IMAGE_SUFFIXES)}) '
                      'in LABEL sub-folders.')

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    from ptm_jax.data import image  # Imported here: PIL is only needed for image folders.
    return {'image': image.decode(self.files[index], name=self.files[index]),
            'label': np.int64(self.labels[index])}


def read_table(path: str, columns: Sequence[str]) -> ArraySource:
  """JSONL (.jsonl/.json, one object per line) or CSV (.csv/.tsv, with a header) as a source.

  Only `columns` are kept; each must be present in every row. String labels are kept as strings
  here; `pipeline.py` maps them to ids.
  """
  if not os.path.isfile(path):
    raise DataError(f'Table file {path} does not exist.')
  lower = path.lower()
  rows: list[dict] = []
  if lower.endswith(('.jsonl', '.json')):
    with open(path, encoding='utf-8') as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except ValueError as e:
            raise DataError(f'{path} line {n} is not a JSON object ({e}); JSONL holds one '
                            'object per line.') from None
  elif lower.endswith(('.csv', '.tsv')):
    with open(path, encoding='utf-8', newline='') as f:
      rows = list(csv.DictReader(f, delimiter='\t' if lower.endswith('.tsv') else ','))
  else:
    raise DataError(f'{path}: unknown table format; use .jsonl, .json (JSON lines), .csv or .tsv.')
  if not rows:
    raise DataError(f'{path} holds no rows.')
  for n, row in enumerate(rows, 1):
    missing = [c for c in columns if c not in row]
    if missing:
      raise DataError(f'{path} row {n} lacks column(s) {missing} (it has {sorted(row)}); set '
                      'config.data.text_key / text_pair_key / label_key to the column names.')
    # A CSV row with too few fields gives None for the rest (and JSON null is None): not the
    # text 'None' or a class named None.
    empty = [c for c in columns if row[c] is None]
    if empty:
      raise DataError(f'{path} row {n} has no value for column(s) {empty} (a CSV row with too '
                      'few fields, or a JSON null); fill them in or drop the row.')
  return ArraySource({c: [row[c] for row in rows] for c in columns}, name=path)
