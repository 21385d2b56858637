"""Reading checkpoint files tensor by tensor, and writing safetensors.

Readers give a key's shape without reading it, and one tensor at a time, so that loading never
holds a second full copy of the model in host memory:
  * safetensors: one file or a sharded `*.safetensors.index.json` (safe_open, memory-mapped);
  * torch pickles (.bin/.pt/.pth): refused unless the caller opts in, then
    torch.load(weights_only=True, mmap=True for zip-format files);
  * .npz (the google-research/vision_transformer checkpoints).
"""

import json
import os
import zipfile
from typing import Iterator

import numpy as np
import safetensors
import safetensors.numpy


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, or that does not fit the model."""


class SafetensorsReader:
  """A single .safetensors file or a sharded index; all files are checked when opened."""

  def __init__(self, path: str):
    self.path = path
    if path.endswith('.index.json'):
      try:
        with open(path) as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f'Cannot read the shard index {path}: {e}') from e
      folder = os.path.dirname(path)
      files = sorted(set(weight_map.values()))
    else:
      folder, files = os.path.dirname(path), [os.path.basename(path)]
      weight_map = None
    self._handles = {}
    for name in files:
      file = os.path.join(folder, name)
      if not os.path.exists(file):
        raise CheckpointError(f'Shard {file} named in {path} does not exist: download it again.')
      try:
        self._handles[name] = safetensors.safe_open(file, framework='numpy')
      except Exception as e:  # safetensors raises its own error types for corrupt headers.
        raise CheckpointError(f'{file} is corrupt or truncated ({e}): download it again.') from e
    if weight_map is None:
      weight_map = {k: files[0] for k in self._handles[files[0]].keys()}
    else:
      for key, name in weight_map.items():
        if key not in self._handles[name].keys():
          raise CheckpointError(f'{os.path.join(folder, name)} lacks {key!r}, which {path} '
                                'places there: the shard is corrupt or from another model.')
    self._weight_map = weight_map

  def keys(self) -> list[str]:
    return list(self._weight_map)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handles[self._weight_map[key]].get_slice(key).get_shape())

  def get(self, key: str) -> np.ndarray:
    try:
      return self._handles[self._weight_map[key]].get_tensor(key)
    except Exception as e:
      raise CheckpointError(f'Cannot read {key!r} from {self.path} ({e}): the file is corrupt or '
                            'truncated; download it again.') from e


class TorchPickleReader:
  """A torch state dict; only with the caller's explicit opt-in (pickles can run code)."""

  def __init__(self, path: str):
    import torch  # Optional: needed only for pickle checkpoints.
    self.path = path
    try:
      # Files saved before torch 1.6 are not zip archives, which torch cannot memory-map.
      state = torch.load(path, map_location='cpu', weights_only=True,
                         mmap=zipfile.is_zipfile(path))
    except Exception as e:
      raise CheckpointError(f'Cannot read the torch checkpoint {path} ({e}).') from e
    if 'state_dict' in state and isinstance(state['state_dict'], dict):
      state = state['state_dict']
    self._state = state

  def keys(self) -> list[str]:
    return list(self._state)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._state[key].shape)

  def get(self, key: str) -> np.ndarray:
    import torch
    t = self._state[key]
    if t.dtype == torch.bfloat16:
      return t.float().numpy()
    return t.numpy()


class NpzReader:
  """A .npz of named arrays ('Transformer/encoderblock_0/...')."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._npz = np.load(path, allow_pickle=False)
      self._keys = list(self._npz.files)
    except Exception as e:
      raise CheckpointError(f'{path} is corrupt or truncated ({e}): download it again.') from e

  def keys(self) -> list[str]:
    return self._keys

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.get(key).shape)

  def get(self, key: str) -> np.ndarray:
    try:
      return self._npz[key]
    except Exception as e:
      raise CheckpointError(f'Cannot read {key!r} from {self.path} ({e}).') from e


PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt')


def open_checkpoint(path: str, allow_pickle: bool = False):
  """A reader for a weights file, or for the weights inside a transformers-format folder."""
  if os.path.isdir(path):
    for name in ('model.safetensors', 'model.safetensors.index.json'):
      if os.path.exists(os.path.join(path, name)):
        return SafetensorsReader(os.path.join(path, name))
    for name in ('pytorch_model.bin', 'pytorch_model.bin.index.json'):
      if os.path.exists(os.path.join(path, name)):
        return open_checkpoint(os.path.join(path, name), allow_pickle)
    raise CheckpointError(f'{path} holds no model.safetensors, sharded index or '
                          'pytorch_model.bin.')
  if not os.path.exists(path):
    raise CheckpointError(f'No checkpoint at {path}.')
  if path.endswith('.safetensors') or path.endswith('.safetensors.index.json'):
    return SafetensorsReader(path)
  if path.endswith('.npz'):
    return NpzReader(path)
  if path.endswith(PICKLE_SUFFIXES) or path.endswith('.bin.index.json'):
    if not allow_pickle:
      raise CheckpointError(
          f'{path} is a pickle checkpoint, which can run arbitrary code when loaded. Convert it '
          'to safetensors, or pass allow_pickle=True if you trust its source (it is then read '
          'with torch.load(weights_only=True)).')
    if path.endswith('.index.json'):
      raise CheckpointError(f'Sharded pickle checkpoints ({path}) are not supported: convert '
                            'them to safetensors.')
    return TorchPickleReader(path)
  raise CheckpointError(f'Unknown checkpoint format: {path} (expected .safetensors, a '
                        '.safetensors.index.json, .npz, or a pickle with allow_pickle=True).')


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], out_dir: str,
                      max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None) -> list[str]:
  """Writes model.safetensors, or shards plus model.safetensors.index.json past max_shard_bytes."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key, array in tensors:
    # ascontiguousarray makes 0-d arrays 1-d; scalars (CLIP's logit_scale) must keep shape ().
    array = np.asarray(array)
    array = np.ascontiguousarray(array).reshape(array.shape)
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = array
    size += array.nbytes
  metadata = {'format': 'pt', **(metadata or {})}
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], os.path.join(out_dir, 'model.safetensors'), metadata)
    return ['model.safetensors']
  names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    safetensors.numpy.save_file(shard, os.path.join(out_dir, name), metadata)
    weight_map.update({k: name for k in shard})
  total = sum(a.nbytes for shard in shards for a in shard.values())
  with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return names
