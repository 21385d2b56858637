"""The mechanism that maps checkpoint tensors onto Flax variables and back.

A family (BERT, GPT-2, ...) describes its checkpoint as a list of `Rule`s: one checkpoint key, the
Flax variable path(s) it becomes, and the layout change in each direction. Everything else -
prefix handling, validation, tensor-by-tensor loading, saving - is generic and lives in
`ptm_jax.hub.pretrained`.
"""

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

from ptm_jax.models import labels

Path = tuple[str, ...]  # ('params', 'bert', 'layer_0', 'attention', 'query', 'kernel')


@dataclasses.dataclass(frozen=True)
class Rule:
  """One checkpoint tensor <-> one or more Flax leaves.

  to_flax maps the checkpoint array to a tuple of arrays, one per path; to_hf maps them back.
  """
  key: str
  paths: tuple[Path, ...]
  to_flax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]


def _one(fn_in, fn_out, key: str, path: Path) -> Rule:
  return Rule(key, (path,), lambda a: (fn_in(a),), lambda arrays: fn_out(arrays[0]))


def same(key: str, path: Path) -> Rule:
  return _one(lambda a: a, lambda a: a, key, path)


def linear_kernel(key: str, path: Path) -> Rule:
  """torch Linear weight (out, in) <-> Dense kernel (in, out)."""
  return _one(lambda a: a.T, lambda a: np.ascontiguousarray(a.T), key, path)


def conv_kernel(key: str, path: Path) -> Rule:
  """torch Conv2d weight (O, I, H, W) <-> Flax Conv kernel (H, W, I, O)."""
  return _one(lambda a: a.transpose(2, 3, 1, 0),
              lambda a: np.ascontiguousarray(a.transpose(3, 2, 0, 1)), key, path)


def reshaped(key: str, path: Path, flax_shape: Sequence[int], hf_shape: Sequence[int]) -> Rule:
  return _one(lambda a: a.reshape(flax_shape), lambda a: a.reshape(hf_shape), key, path)


def split_last(key: str, paths: tuple[Path, ...]) -> Rule:
  """A fused (..., n*k) checkpoint tensor <-> n Flax leaves of (..., k) (GPT-2's c_attn)."""
  n = len(paths)
  return Rule(key, paths, lambda a: tuple(np.split(a, n, axis=-1)),
              lambda arrays: np.concatenate(arrays, axis=-1))


def linear(key: str, path: Path, bias: bool = True) -> list[Rule]:
  rules = [linear_kernel(f'{key}.weight', path + ('kernel',))]
  if bias:
    rules.append(same(f'{key}.bias', path + ('bias',)))
  return rules


def layer_norm(key: str, path: Path) -> list[Rule]:
  return [same(f'{key}.weight', path + ('scale',)), same(f'{key}.bias', path + ('bias',))]


def embedding(key: str, path: Path) -> Rule:
  return same(f'{key}.weight', path + ('embedding',))


def batch_norm(key: str, path: Path) -> list[Rule]:
  """torch BatchNorm2d <-> nn.BatchNorm: weight/bias are params, running stats batch_stats."""
  stats = ('batch_stats',) + path[1:]
  return [same(f'{key}.weight', path + ('scale',)), same(f'{key}.bias', path + ('bias',)),
          same(f'{key}.running_mean', stats + ('mean',)),
          same(f'{key}.running_var', stats + ('var',))]


def attention_block(key: str, path: Path, names: dict[str, str]) -> list[Rule]:
  """Rules for a TransformerBlock from the checkpoint's names of its ten linear/LN pieces.

  names maps our submodules (query, key, value, out, fc_in, fc_out, ln_attention, ln_mlp) to the
  checkpoint's module names relative to `key`.
  """
  rules = []
  for ours in ('query', 'key', 'value', 'out'):
    rules += linear(f'{key}.{names[ours]}', path + ('attention', ours))
  for ours in ('fc_in', 'fc_out'):
    rules += linear(f'{key}.{names[ours]}', path + ('mlp', ours))
  for ours in ('ln_attention', 'ln_mlp'):
    rules += layer_norm(f'{key}.{names[ours]}', path + (ours,))
  return rules


# Non-parameter buffers that real checkpoints carry and that loading skips.
KNOWN_BUFFERS = (
    re.compile(r'(^|\.)position_ids$'),
    re.compile(r'(^|\.)attn\.bias$'),
    re.compile(r'(^|\.)attn\.masked_bias$'),
    re.compile(r'(^|\.)num_batches_tracked$'),
)


@dataclasses.dataclass(frozen=True)
class Family:
  """What the generic loader needs to know about one model family.

  architectures maps transformers' class names to our head names; `prefix` is the base model's
  key prefix in a checkpoint with a head ('bert.'), empty for families without one.
  tied_keys are checkpoint keys that duplicate another tensor (a tied decoder) and are skipped.
  adapt_tensor may reshape a checkpoint tensor whose shape legitimately differs from the model's
  (ViT position embeddings at a new image size); it returns None when it cannot.
  """
  name: str
  model_types: tuple[str, ...]
  config_cls: type
  architectures: dict[str, str | None]
  make_module: Callable[..., Any]
  rules: Callable[[Any, str | None], list[Rule]]
  prefix: str = ''
  tied_keys: tuple[str, ...] = ()
  extra_hf_config: Callable[[Any, str | None], dict] = lambda config, head: {}
  adapt_tensor: Callable[[str, np.ndarray, tuple[int, ...]], np.ndarray | None] = (
      lambda key, array, shape: None)
  # config.json -> config, called as config_from_hf(config_cls, hf, **overrides); None is the
  # flat `config_from_hf` below. Families whose config.json nests sub-configs (CLIP) give theirs.
  config_from_hf: Callable[..., Any] | None = None

  def config(self, hf: dict, **overrides):
    """This family's config dataclass from a transformers config.json dict."""
    from_hf = self.config_from_hf or config_from_hf
    return from_hf(self.config_cls, hf, **overrides)

  def architecture(self, head: str | None) -> str:
    for arch, h in self.architectures.items():
      if h == head:
        return arch
    raise ValueError(f'{self.name} has no head {head!r}; heads: '
                     f'{sorted(str(h) for h in self.architectures.values())}.')

  def head(self, architecture: str) -> str | None:
    try:
      return self.architectures[architecture]
    except KeyError:
      raise ValueError(f'Unknown {self.name} architecture {architecture!r} in config.json; '
                       f'known: {sorted(self.architectures)}.') from None


def config_from_hf(config_cls, hf: dict, **overrides):
  """A config dataclass from a transformers config.json dict (unknown keys are ignored)."""
  names = getattr(config_cls, 'HF_NAMES', {})
  kwargs = {}
  for field in dataclasses.fields(config_cls):
    hf_name = names.get(field.name, field.name)
    if hf_name in hf and hf[hf_name] is not None:
      kwargs[field.name] = hf[hf_name]
  if 'id2label' in kwargs:
    kwargs.setdefault('num_labels', len(kwargs['id2label']))
    # The checkpoint's names are its own head's: a new head (num_labels overridden, names of its
    # own) takes the names given or LABEL_i, as transformers does.
    if ('id2label' in overrides
        or overrides.get('num_labels', kwargs['num_labels']) != len(kwargs['id2label'])):
      del kwargs['id2label']
      kwargs.pop('label2id', None)
  else:
    kwargs.pop('label2id', None)  # Names without ids say nothing.
  unknown = set(overrides) - {f.name for f in dataclasses.fields(config_cls)}
  if unknown:
    raise ValueError(f'Unknown {config_cls.__name__} fields {sorted(unknown)}; fields: '
                     f'{[f.name for f in dataclasses.fields(config_cls)]}.')
  kwargs.update(overrides)
  return config_cls(**kwargs)


def config_to_hf(config) -> dict:
  names = getattr(type(config), 'HF_NAMES', {})
  hf = {}
  ours_only = getattr(type(config), 'NOT_IN_HF', ())
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.name in ours_only:
      if value != field.default:
        raise ValueError(f'{type(config).__name__} with {field.name}={value} has no '
                         'transformers equivalent, so it cannot be saved in that format.')
      continue
    if dataclasses.is_dataclass(value):
      value = config_to_hf(value)
    hf[names.get(field.name, field.name)] = value
  if 'num_labels' in hf:  # transformers counts the classes by id2label.
    hf.update(labels.to_hf(hf.pop('num_labels'), hf.pop('id2label'), hf.pop('label2id')))
  return hf
