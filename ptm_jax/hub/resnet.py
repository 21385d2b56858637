"""ResNet checkpoints <-> ptm_jax.models.resnet.

Two formats:
  * transformers' ResNetModel / ResNetForImageClassification (from_pretrained / save_pretrained
    through FAMILY): embedder.embedder.*, encoder.stages.{s}.layers.{b}.layer.{k} / .shortcut,
    classifier.1;
  * torchvision's and timm's resnet18..152 state dicts (`from_torchvision`): conv1/bn1,
    layer{s+1}.{b}.conv{k+1}/bn{k+1}, downsample.0/.1, fc.
BatchNorm running_mean/var land in the batch_stats collection; num_batches_tracked is skipped.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ptm_jax.hub import checkpoint_io
from ptm_jax.hub import convert
from ptm_jax.hub import pretrained
from ptm_jax.models import resnet

_BASE = ('params', 'resnet')


def _conv_norm(conv_key: str, norm_key: str, path: convert.Path) -> list[convert.Rule]:
  return ([convert.conv_kernel(f'{conv_key}.weight', path + ('conv', 'kernel'))]
          + convert.batch_norm(norm_key, path + ('norm',)))


def rules(config: resnet.ResNetConfig, head: str | None) -> list[convert.Rule]:
  """transformers' names."""
  p = 'resnet.' if head is not None else ''  # transformers' base_model_prefix
  out = _conv_norm(f'{p}embedder.embedder.convolution', f'{p}embedder.embedder.normalization',
                   _BASE + ('stem',))
  for s, b, _, _, _, has_shortcut in resnet.block_specs(config):
    key = f'{p}encoder.stages.{s}.layers.{b}'
    path = _BASE + (f'stage_{s}_block_{b}',)
    for k in range(resnet.conv_layer_count(config)):
      out += _conv_norm(f'{key}.layer.{k}.convolution', f'{key}.layer.{k}.normalization',
                        path + (f'conv_{k}',))
    if has_shortcut:
      out += _conv_norm(f'{key}.shortcut.convolution', f'{key}.shortcut.normalization',
                        path + ('shortcut',))
  if head == 'classification':
    out += convert.linear('classifier.1', ('params', 'classifier'))  # classifier.0 is Flatten.
  return out


def torchvision_rules(config: resnet.ResNetConfig, head: str | None) -> list[convert.Rule]:
  """torchvision's (and timm's) names."""
  out = _conv_norm('conv1', 'bn1', _BASE + ('stem',))
  for s, b, _, _, _, has_shortcut in resnet.block_specs(config):
    key = f'layer{s + 1}.{b}'
    path = _BASE + (f'stage_{s}_block_{b}',)
    for k in range(resnet.conv_layer_count(config)):
      out += _conv_norm(f'{key}.conv{k + 1}', f'{key}.bn{k + 1}', path + (f'conv_{k}',))
    if has_shortcut:
      out += _conv_norm(f'{key}.downsample.0', f'{key}.downsample.1', path + ('shortcut',))
  if head == 'classification':
    out += convert.linear('fc', ('params', 'classifier'))
  return out


FAMILY = convert.Family(
    name='resnet',
    model_types=('resnet',),
    config_cls=resnet.ResNetConfig,
    architectures={'ResNetModel': None, 'ResNetForImageClassification': 'classification'},
    make_module=lambda config, **kw: resnet.ResNet(config, **kw),
    rules=rules,
    prefix='resnet.',
)


class _StripPrefix:
  """A reader whose keys lose a wrapper's prefix ('module.' from DistributedDataParallel)."""

  def __init__(self, reader, prefix: str):
    self._reader, self._prefix = reader, prefix

  def keys(self) -> list[str]:
    return [k[len(self._prefix):] for k in self._reader.keys()]

  def shape(self, key: str):
    return self._reader.shape(self._prefix + key)

  def get(self, key: str):
    return self._reader.get(self._prefix + key)


def from_torchvision(path_or_state_dict_file: str,
                     config: resnet.ResNetConfig | str = 'resnet50',
                     head: str | None = 'classification', *, allow_pickle: bool = False,
                     dtype: Any = None, param_dtype: Any = jnp.float32,
                     shardings: Any = None, mesh: jax.sharding.Mesh | None = None, rules=None):
  """Loads a torchvision or timm ResNet state dict into a ptm_jax ResNet.

  Args:
    path_or_state_dict_file: a .safetensors file, or a .pth/.pt/.bin state dict with
      allow_pickle=True (read with torch.load(weights_only=True); a {'state_dict': ...} wrapper
      and a 'module.' key prefix are unwrapped).
    config: a ResNetConfig, or a PRESETS name ('resnet18' ... 'resnet152'). With a preset name,
      num_labels is taken from the checkpoint's fc layer.
    head: 'classification' (fc becomes the classifier) or None (fc is dropped).
    allow_pickle: permit pickle checkpoints, which can run code when loaded: only for trusted files.
    dtype / param_dtype, shardings / mesh, rules: as in ptm_jax.from_pretrained.

  Returns:
    (module, variables) with variables {'params': ..., 'batch_stats': ...}.
  """
  if head not in resnet.HEADS:
    raise ValueError(f'Unknown ResNet head {head!r}; choose one of {resnet.HEADS}.')
  preset = isinstance(config, str)
  if preset:
    if config not in resnet.PRESETS:
      raise ValueError(f'Unknown ResNet preset {config!r}; presets: {sorted(resnet.PRESETS)}, '
                       'or pass a ResNetConfig.')
    config = resnet.PRESETS[config]
  reader = checkpoint_io.open_checkpoint(path_or_state_dict_file, allow_pickle=allow_pickle)
  keys = reader.keys()
  if keys and all(k.startswith('module.') for k in keys):
    reader = _StripPrefix(reader, 'module.')
  if preset and head == 'classification' and 'fc.weight' in reader.keys():
    config = dataclasses.replace(config, num_labels=reader.shape('fc.weight')[0])
  module = resnet.ResNet(config, head=head, dtype=dtype or jnp.float32, param_dtype=param_dtype)
  variables = pretrained.load_variables(
      module, FAMILY, reader, head=head, shardings=shardings, mesh=mesh, rules=rules,
      key_rules=torchvision_rules(config, head),
      skip_keys=(r'^fc\.(weight|bias)$',) if head is None else ())
  return module, variables
