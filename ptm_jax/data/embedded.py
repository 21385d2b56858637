"""Datasets that exist on a fresh machine with no download.

`digits`: scikit-learn's bundled copy of the UCI optical handwritten digits (1,797 grey images of
8x8 pixels, 10 classes, intensities 0..16, written by 43 people). Small, but real handwriting, so
it can show transfer from one task to another: `classes` picks a subset (e.g. pre-train on 0-4,
adapt to 5-9) with labels renumbered from 0.

The split is fixed: a stratified 80/20 train/test split by a seeded permutation, the same on every
machine, so figures are comparable between runs and people.
"""

from typing import Sequence

import numpy as np

from ptm_jax.data.sources import ArraySource, DataError

DIGITS_SPLITS = ('train', 'test')
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2


def _digits_split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Per class, a seeded permutation; its first 20% (rounded) go to test."""
  rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(len(idx) * _DIGITS_TEST_FRACTION))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return {'train': np.sort(np.concatenate(train)), 'test': np.sort(np.concatenate(test))}


def digits(split: str, classes: Sequence[int] | None = None) -> ArraySource:
  """The digits split as {'image': uint8 (8, 8, 1) scaled to 0..255, 'label': int64}.

  Args:
    split: 'train' (1,438 images) or 'test' (359).
    classes: keep only these digits, relabelled 0..len(classes)-1 in the given order.
  """
  from sklearn import datasets  # Imported here: only the embedded dataset needs scikit-learn.

  if split not in DIGITS_SPLITS:
    raise DataError(f'The digits dataset has splits {DIGITS_SPLITS}, not {split!r}.')
  bunch = datasets.load_digits()
  labels = bunch.target.astype(np.int64)
  # 0..16 -> 0..255 as uint8 so that digits go through the same image path as any photo.
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  idx = _digits_split_indices(labels)[split]
  images, labels = images[idx], labels[idx]
  if classes is not None:
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c <= 9]
    if bad or len(set(classes)) != len(classes):
      raise DataError(f'digits classes must be distinct digits 0-9, got {classes}.')
    keep = np.isin(labels, classes)
    remap = np.full(10, -1, np.int64)
    remap[classes] = np.arange(len(classes))
    images, labels = images[keep], remap[labels[keep]]
  return ArraySource({'image': images, 'label': labels}, name=f'digits/{split}')


# name -> builder(split, **options) of a random-access source.
EMBEDDED = {'digits': digits}
