"""Class names and problem type of a classification head: transformers' id2label, label2id and
problem_type, kept in the family configs (BertConfig, ViTConfig, ResNetConfig) so that a
checkpoint's classes survive from_pretrained -> save_pretrained.

They describe the classes, not the model's numbers: `field()` leaves them out of the configs'
==/hash, so modules that differ only in them share flax's and jax.jit's caches (one compiled
program), and the parameter tree never depends on them.
"""

import dataclasses
from collections.abc import Mapping

PROBLEM_TYPES = ('regression', 'single_label_classification', 'multi_label_classification')


def field():
  """A config field of metadata: default None, not compared or hashed."""
  return dataclasses.field(default=None, compare=False)


def _names(id2label, num_labels: int) -> tuple[str, ...]:
  """id2label as a dict {id: name} (int or config.json's str ids) or a sequence -> names by id."""
  if isinstance(id2label, str):
    raise ValueError(f'id2label must map class ids to names (or list one name per class), got '
                     f'the string {id2label!r}.')
  if not isinstance(id2label, Mapping):
    names = tuple(str(name) for name in id2label)
  else:
    try:
      by_id = {int(i): str(name) for i, name in id2label.items()}
    except ValueError:
      by_id = {}
    if sorted(by_id) != list(range(len(id2label))):
      raise ValueError(f'id2label keys must be the class ids 0..{len(id2label) - 1}, got '
                       f'{list(id2label)}.')
    names = tuple(by_id[i] for i in range(len(by_id)))
  if len(names) != num_labels:
    raise ValueError(f'id2label names {len(names)} classes but num_labels is {num_labels}: '
                     'give one name per class (or id2label=None for LABEL_i), or set '
                     f'num_labels={len(names)}.')
  return names


def normalise(config) -> None:
  """Checks and normalises config's id2label / label2id / problem_type in place (__post_init__).

  Afterwards id2label is None (transformers' LABEL_i) or the names by class id, a tuple of
  num_labels strings; label2id is None (the inverse of id2label) or ((name, id), ...) pairs
  when a checkpoint's differs from that inverse.
  """
  names = None if config.id2label is None else _names(config.id2label, config.num_labels)
  object.__setattr__(config, 'id2label', names)
  if config.label2id is not None:
    if names is None:
      raise ValueError('label2id is set without id2label: set id2label (label2id defaults to its '
                       'inverse).')
    try:
      pairs = tuple((str(name), int(i)) for name, i in dict(config.label2id).items())
    except (TypeError, ValueError):
      raise ValueError(f'label2id must map class names to ids, got {config.label2id!r}.') from None
    inverse = {name: i for i, name in enumerate(names)}
    object.__setattr__(config, 'label2id', None if dict(pairs) == inverse else pairs)
  if config.problem_type is not None and config.problem_type not in PROBLEM_TYPES:
    raise ValueError(f'Unknown problem_type {config.problem_type!r}; choose one of '
                     f'{PROBLEM_TYPES} or None.')
  if config.problem_type == 'single_label_classification' and config.num_labels == 1:
    raise ValueError('problem_type single_label_classification needs num_labels > 1 (as in '
                     "transformers): use num_labels=2, or problem_type='regression'.")


def to_hf(num_labels: int, id2label, label2id) -> dict:
  """config.json's id2label and label2id (LABEL_i names where id2label is None)."""
  names = id2label or tuple(f'LABEL_{i}' for i in range(num_labels))
  return {'id2label': {str(i): name for i, name in enumerate(names)},
          'label2id': dict(label2id or ((name, i) for i, name in enumerate(names)))}
