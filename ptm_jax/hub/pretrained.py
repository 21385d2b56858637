"""from_pretrained / save_pretrained: transformers-format folders <-> (module, variables).

Loading is checked before anything is read: every key is accounted for (known buffers and tied
duplicates skipped, anything else unexpected is an error unless allowed), every shape matches, and
only then are tensors read one at a time, converted, and placed (optionally straight into a
sharding). A failure at any point returns nothing half-loaded.
"""

import importlib
import json
import logging
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptm_jax import partitioning
from ptm_jax.hub import checkpoint_io
from ptm_jax.hub import convert
from ptm_jax.hub.checkpoint_io import CheckpointError

log = logging.getLogger(__name__)

# model_type in config.json -> the module of ptm_jax.hub that defines that FAMILY.
_FAMILY_MODULES = {
    'bert': 'bert', 'gpt2': 'gpt2', 'vit': 'vit', 'clip': 'clip', 'resnet': 'resnet',
}
_HUB_FILES = ['config.json', '*.safetensors', '*.safetensors.index.json', 'tokenizer.json',
              'tokenizer_config.json', 'vocab.txt', 'vocab.json', 'merges.txt',
              'special_tokens_map.json', 'preprocessor_config.json',
              'sentence_bert_config.json']  # its max_seq_length is the tokenizer's default


def family_for_model_type(model_type: str) -> convert.Family:
  if model_type not in _FAMILY_MODULES:
    raise ValueError(f'Unknown model_type {model_type!r} in config.json; ptm_jax knows '
                     f'{sorted(_FAMILY_MODULES)}.')
  return importlib.import_module(f'ptm_jax.hub.{_FAMILY_MODULES[model_type]}').FAMILY


def family_for_module(module: nn.Module) -> convert.Family:
  for model_type in _FAMILY_MODULES:
    family = family_for_model_type(model_type)
    if isinstance(module.config, family.config_cls):
      return family
  raise ValueError(f'{type(module).__name__} is not a ptm_jax model family.')


def resolve(path_or_hub_id: str, revision: str | None = None,
            cache_dir: str | None = None, allow_pickle: bool = False) -> str:
  """A local folder, or a hub id fetched with huggingface_hub (falling back to its cache).

  With allow_pickle, a repo without safetensors weights has its pytorch_model.bin fetched too.
  """
  if os.path.exists(path_or_hub_id):
    return path_or_hub_id
  if path_or_hub_id.startswith(('/', '.', '~')) or path_or_hub_id.count('/') > 1:
    # A path, not a hub id ('NAME' or 'OWNER/NAME'): asking the hub would only add its noise.
    raise FileNotFoundError(f'{path_or_hub_id} does not exist: pass an existing folder, or a '
                            "hub id such as 'google-bert/bert-base-uncased'.")
  try:
    import huggingface_hub
  except ImportError:
    raise FileNotFoundError(f'{path_or_hub_id} is not a local path and huggingface_hub is not '
                            'installed to fetch it.') from None

  def fetch(patterns):
    try:
      return huggingface_hub.snapshot_download(path_or_hub_id, revision=revision,
                                               allow_patterns=patterns, cache_dir=cache_dir)
    except Exception as online_error:  # No network: the local cache may still hold it.
      try:
        return huggingface_hub.snapshot_download(path_or_hub_id, revision=revision,
                                                 allow_patterns=patterns, cache_dir=cache_dir,
                                                 local_files_only=True)
      except Exception:
        raise FileNotFoundError(
            f'{path_or_hub_id} is neither a local folder nor in the Hugging Face cache, and the '
            f'hub could not be reached ({online_error}). Download it where there is network '
            '(huggingface-cli download ID) and pass the folder.') from online_error

  folder = fetch(_HUB_FILES)
  if allow_pickle and not any(os.path.exists(os.path.join(folder, name)) for name in
                              ('model.safetensors', 'model.safetensors.index.json')):
    folder = fetch(_HUB_FILES + ['pytorch_model.bin'])
  return folder


def read_config(folder: str) -> dict:
  path = os.path.join(folder, 'config.json')
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f'{folder} has no config.json; from_pretrained needs a '
                          'transformers-format folder.') from None
  except ValueError as e:
    raise CheckpointError(f'{path} is not valid JSON ({e}).') from e


def model_type_of(folder: str, hf_config: dict | None = None) -> str:
  """config.json's model_type (read from `folder` unless given), checked to be a known family."""
  hf_config = read_config(folder) if hf_config is None else hf_config
  model_type = hf_config.get('model_type')
  if model_type is None:
    raise CheckpointError(f'{folder}/config.json has no model_type; add the family\'s (one of '
                          f'{sorted(_FAMILY_MODULES)}), as transformers\' save_pretrained writes '
                          'it.')
  family_for_model_type(model_type)  # raises for a family ptm_jax does not know
  return model_type


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _leaf_paths(tree, prefix=()) -> list[tuple[str, ...]]:
  if isinstance(tree, dict):
    return [p for k in tree for p in _leaf_paths(tree[k], prefix + (k,))]
  return [prefix]


def _normalise_key(key: str, expected: set[str], prefix: str) -> str:
  """Maps a checkpoint key onto the naming of the module being loaded.

  Base checkpoints lack the head models' prefix ('bert.') and head checkpoints carry it; old
  checkpoints name LayerNorm parameters gamma/beta.
  """
  key = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', key)
  key = re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', key)
  if key in expected or not prefix:
    return key
  if prefix + key in expected:
    return prefix + key
  if key.startswith(prefix) and key[len(prefix):] in expected:
    return key[len(prefix):]
  return key


def _other_heads_keys(family: convert.Family, config, keys: list[str]) -> list[str]:
  """The checkpoint keys among `keys` that are another head's weights (a top-level module the
  base model lacks) or parts of the base model that the head at hand leaves out."""
  bare = {r.key for r in family.rules(config, None)}  # the base model's keys, unprefixed
  tops = {k.split('.')[0] for k in bare}

  def other(key):
    if key.startswith(family.prefix):
      return key[len(family.prefix):] in bare
    return key in bare or key.split('.')[0] not in tops
  return [k for k in keys if other(k)]


def load_variables(module: nn.Module, family: convert.Family, reader, *,
                   allow_unexpected_keys: bool = False, init_missing_head: bool = False,
                   head: str | None = None, rng: jax.Array | None = None,
                   shardings: Any = None, mesh: jax.sharding.Mesh | None = None,
                   rules=None, key_rules: list[convert.Rule] | None = None,
                   skip_keys: tuple[str, ...] = ()) -> dict:
  """Reads `reader`'s tensors into the variables of `module` (see from_pretrained)."""
  abstract_boxed = partitioning.abstract_variables(module)
  abstract = nn.unbox(abstract_boxed)
  if shardings is None and mesh is not None:
    shardings = partitioning.variable_shardings(
        abstract_boxed, mesh, rules or partitioning.LOGICAL_RULES)

  key_rules = family.rules(module.config, head) if key_rules is None else key_rules
  by_key = {r.key: r for r in key_rules}
  covered = {p for r in key_rules for p in r.paths}
  leaves = set(_leaf_paths(abstract))
  assert covered == leaves, (  # A bug in a family's rules, never the user's input.
      f'{family.name} rules and module disagree: no rule for {sorted(leaves - covered)}, '
      f'no variable for {sorted(covered - leaves)}')

  # 1. Account for every checkpoint key before reading any tensor.
  skip = [re.compile(p) for p in family.tied_keys + tuple(skip_keys)]
  key_of = {}
  unexpected = []
  for raw in reader.keys():
    if any(p.search(raw) for p in convert.KNOWN_BUFFERS + tuple(skip)):
      continue
    key = _normalise_key(raw, set(by_key), family.prefix)
    if key in by_key:
      key_of[key] = raw
    else:
      unexpected.append(raw)
  new_head = init_missing_head and head is not None and bool(family.prefix)
  if unexpected and new_head:
    # A head of its own on a checkpoint of another (a classifier on a pre-training checkpoint):
    # that head's weights, and base-model parts this head leaves out (ViT's pooler), are dropped
    # as transformers drops them. Keys of the base model itself stay an error.
    unused = _other_heads_keys(family, module.config, unexpected)
    if unused:
      log.warning('Dropped %d checkpoint keys that head %r does not use: %s', len(unused), head,
                  sorted(unused))
    unexpected = [k for k in unexpected if k not in unused]
  if unexpected and not allow_unexpected_keys:
    raise CheckpointError(
        f'{len(unexpected)} checkpoint keys have no place in {family.name} (head {head!r}): '
        f'{sorted(unexpected)[:20]}{" ..." if len(unexpected) > 20 else ""}. Pick the head that '
        'matches the checkpoint, or pass allow_unexpected_keys=True to drop them.')
  if unexpected:
    log.warning('Dropped %d unexpected checkpoint keys: %s', len(unexpected), sorted(unexpected))

  missing = [k for k in by_key if k not in key_of]
  head_keys = [k for k in missing if family.prefix and head is not None
               and not k.startswith(family.prefix)]
  if missing and not (init_missing_head and len(head_keys) == len(missing)):
    hint = (' They are head weights: pass init_missing_head=True to initialise them.'
            if head_keys and len(head_keys) == len(missing) else '')
    raise CheckpointError(f'{len(missing)} keys missing from the checkpoint for {family.name} '
                          f'(head {head!r}): {sorted(missing)[:20]}.{hint}')

  # 2. Check every shape (after the layout change) before reading.
  targets = {}
  resized = []
  for key, raw in key_of.items():
    rule = by_key[key]
    found = reader.shape(raw)
    # A zero-strided stand-in runs the layout change without reading or allocating the tensor.
    stand_ins = rule.to_flax(np.broadcast_to(np.float32(0), found))
    for path, arr in zip(rule.paths, stand_ins):
      expected = tuple(_get(abstract, path).shape)
      if tuple(arr.shape) == expected or family.adapt_tensor(key, arr, expected) is not None:
        continue
      if new_head and not key.startswith(family.prefix):
        resized.append(key)  # a head of another size (num_labels changed): initialised below
        break
      raise CheckpointError(
          f'Shape mismatch for {raw!r} -> {"/".join(path)}: the model expects {expected}, the '
          f'checkpoint has {tuple(found)} (as {tuple(arr.shape)} after the layout change). '
          'Is config.json the one that belongs to these weights?')
    else:  # every tensor of the key fits
      targets[key] = raw

  # 3. Read, convert and place one tensor at a time.
  def place(path, array):
    leaf = _get(abstract, path)
    array = np.asarray(array, dtype=leaf.dtype)
    if shardings is not None:
      return jax.device_put(array, _get(shardings, path))
    return jnp.asarray(array)

  variables: dict = {}
  for key, raw in targets.items():
    rule = by_key[key]
    for path, arr in zip(rule.paths, rule.to_flax(reader.get(raw))):
      expected = tuple(_get(abstract, path).shape)
      if tuple(arr.shape) != expected:
        arr = family.adapt_tensor(key, arr, expected)
      _set(variables, path, place(path, arr))

  if resized:
    log.warning('The checkpoint\'s head weights %s do not fit head %r of this config (another '
                'num_labels?): initialised anew.', sorted(key_of[k] for k in resized), head)
  if missing or resized:
    paths = [p for k in missing + resized for p in by_key[k].paths]
    rng = jax.random.key(0) if rng is None else rng
    inputs = module.example_inputs()

    @jax.jit  # XLA computes only the leaves returned, not the whole model.
    def init_head(rng):
      return [_get(nn.unbox(module.init(rng, **inputs)), p) for p in paths]

    for path, value in zip(paths, init_head(rng)):
      _set(variables, path, place(path, np.asarray(value)))
    log.warning('Initialised %d head parameters that the checkpoint lacks: %s', len(paths),
                ['/'.join(p) for p in paths])
  return variables


def from_pretrained(path_or_hub_id: str, dtype: Any = None, *, head: Any = 'auto',
                    param_dtype: Any = jnp.float32, config_overrides: dict | None = None,
                    allow_unexpected_keys: bool = False, init_missing_head: bool | None = None,
                    allow_pickle: bool = False, rng: jax.Array | None = None,
                    shardings: Any = None, mesh: jax.sharding.Mesh | None = None, rules=None,
                    revision: str | None = None, cache_dir: str | None = None):
  """Loads a transformers-format checkpoint into a Flax module and its variables.

  Args:
    path_or_hub_id: a folder with config.json and model.safetensors (or a sharded index, or
      pytorch_model.bin with allow_pickle), or a hub id (fetched with huggingface_hub when the
      network allows, else read from its local cache).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay in `param_dtype`.
    head: 'auto' takes the head from config.json's architectures; None is the bare model;
      a head name ('mlm', 'sequence_classification', ...) asks for that head, whose weights are
      initialised and reported when the checkpoint lacks them.
    config_overrides: fields of the family's config to change (num_labels, image_size, dropout;
      for a classification head also id2label, the class names as {id: name} or a list,
      and problem_type). The checkpoint's class names are kept unless num_labels changes,
      when they become LABEL_i; save_pretrained writes them (and problem_type) back.
    allow_unexpected_keys: drop (with a warning) checkpoint keys the model has no place for.
    init_missing_head: initialise missing head weights; defaults to True when `head` is given.
    allow_pickle: permit .bin/.pt checkpoints (read with torch.load(weights_only=True)).
    shardings / mesh, rules: place each tensor straight into its sharding (a pytree of
      Shardings like the variables, or the mesh and logical rules to derive it).
    revision, cache_dir: for hub ids, passed to huggingface_hub.snapshot_download.

  Returns:
    (module, variables): variables is {'params': ..., ['batch_stats': ...]} of jax.Arrays.
  """
  folder = resolve(path_or_hub_id, revision, cache_dir, allow_pickle)
  hf_config = read_config(folder)
  family = family_for_model_type(model_type_of(folder, hf_config))
  if head == 'auto':
    archs = hf_config.get('architectures') or [family.architecture(None)]
    head = family.head(archs[0])
    init_missing_head = bool(init_missing_head)
  elif init_missing_head is None:
    init_missing_head = True
  config = family.config(hf_config, **(config_overrides or {}))
  module = family.make_module(config, head=head, dtype=dtype or jnp.float32,
                              param_dtype=param_dtype)
  reader = checkpoint_io.open_checkpoint(folder, allow_pickle=allow_pickle)
  # (Only the heads that use the word embeddings as their decoder.)
  if (hf_config.get('tie_word_embeddings') is False and family.tied_keys
      and head in ('mlm', 'pretraining', 'lm')):
    # Untied, the "duplicates" are weights of their own, which the (tied) model cannot hold.
    tied = [re.compile(p) for p in family.tied_keys]
    untied = sorted(k for k in reader.keys() if any(p.search(k) for p in tied))
    if untied and not allow_unexpected_keys:
      raise CheckpointError(
          f'{folder}/config.json sets tie_word_embeddings=false and the checkpoint has its own '
          f'{untied}, but ptm_jax\'s {family.name} ties them to the word embeddings, so its '
          'outputs would differ. Pass allow_unexpected_keys=True to drop them (for the bare '
          'model or a new head, which do not use them).')
    if untied:
      log.warning('Dropped the untied checkpoint keys %s (tie_word_embeddings=false).', untied)
  variables = load_variables(module, family, reader, head=head,
                             allow_unexpected_keys=allow_unexpected_keys,
                             init_missing_head=init_missing_head, rng=rng, shardings=shardings,
                             mesh=mesh, rules=rules)
  return module, variables


def save_pretrained(module: nn.Module, variables: dict, out_dir: str, *,
                    max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes config.json and model.safetensors that transformers loads into the same class."""
  family = family_for_module(module)
  head = getattr(module, 'head', None)
  os.makedirs(out_dir, exist_ok=True)
  variables = jax.tree.map(np.asarray, nn.unbox(variables))
  hf_config = convert.config_to_hf(module.config)
  hf_config.update(family.extra_hf_config(module.config, head))
  hf_config['model_type'] = family.model_types[0]
  hf_config['architectures'] = [family.architecture(head)]
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)

  def tensors():
    for rule in family.rules(module.config, head):
      yield rule.key, rule.to_hf(tuple(_get(variables, p) for p in rule.paths))

  checkpoint_io.write_safetensors(tensors(), out_dir, max_shard_bytes)
  return out_dir
