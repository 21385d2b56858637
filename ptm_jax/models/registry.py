"""Models by name: every family's presets, the head each task needs, the inputs each task feeds.

`build_model(config.model, task, info)` gives a module for a training run: a preset
(`model.name`, e.g. 'vit-b/16', 'gpt2-small', 'resnet50') with any of its config fields
overridden by the other `config.model` keys (`model.num_layers=4`), and the fields the data
fixes (num_labels, vocab_size, image_size, positions) set from the dataset.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from ptm_jax.models import bert, clip, gpt2, layers, resnet, vit

FAMILIES = {
    'bert': (bert.Bert, bert.PRESETS), 'gpt2': (gpt2.GPT2, gpt2.PRESETS),
    'vit': (vit.ViT, vit.PRESETS), 'resnet': (resnet.ResNet, resnet.PRESETS),
    'clip': (clip.CLIP, clip.PRESETS),
}
# (family, data task) -> the model head that task trains.
TASK_HEADS = {
    ('vit', 'image_classification'): 'classification',
    ('resnet', 'image_classification'): 'classification',
    ('bert', 'text_classification'): 'sequence_classification',
    ('bert', 'mlm_nsp'): 'pretraining',
    ('gpt2', 'causal_lm'): 'lm',
    ('clip', 'image_text'): None,
}
# data task -> ptm_jax.train.objectives name
TASK_OBJECTIVES = {
    'image_classification': 'classification', 'text_classification': 'classification',
    'causal_lm': 'causal_lm', 'mlm_nsp': 'mlm_nsp', 'image_text': 'contrastive',
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# config.model keys that are not fields of a family's config. zero_init_residual (ResNet only):
# every residual block's last BatchNorm scale starts at 0 (resnet.ResNet.zero_init_residual).
_RUN_KEYS = ('name', 'dtype', 'remat', 'scan_layers', 'zero_init_residual')


def family_of(name: str) -> str:
  for family, (_, presets) in FAMILIES.items():
    if name in presets:
      return family
  known = {f: sorted(p) for f, (_, p) in FAMILIES.items()}
  raise ValueError(f'Unknown model.name {name!r}; presets by family: {known}.')


def head_for(family: str, task: str) -> str | None:
  if (family, task) not in TASK_HEADS:
    fits = sorted(f for f, t in TASK_HEADS if t == task)
    raise ValueError(f'A {family} model cannot train the {task!r} task; families for it: {fits}.')
  return TASK_HEADS[(family, task)]


def data_fields(family: str, task: str, info, data: ml_collections.ConfigDict) -> dict:
  """Config fields the data decides: classes, vocabulary, image size, sequence length."""
  out: dict[str, Any] = {}
  if task in ('image_classification', 'text_classification') and info.num_classes:
    out['num_labels'] = int(info.num_classes)
    names = getattr(info, 'class_names', None)
    if names is not None and len(names) == info.num_classes:
      # The head's class names, which save_pretrained writes as config.json's id2label.
      out['id2label'] = tuple(str(n) for n in names)
  if family in ('vit', 'resnet') and data.channels != 3:
    out['num_channels'] = int(data.channels)
  if family == 'vit':
    out['image_size'] = int(data.image_size)
  if family in ('bert', 'gpt2') and info.vocab_size:
    out['vocab_size'] = int(info.vocab_size)
  return out


def _replace(cfg, fields: dict, family: str):
  known = {f.name for f in dataclasses.fields(cfg)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'config.model has key(s) {unknown} that the {family} config does not; its '
                     f'fields are {sorted(known)}.')
  return dataclasses.replace(cfg, **fields)


def model_config(model: ml_collections.ConfigDict, task: str, info, data):
  """The family config of a random-initialised run: preset, then config.model, then data."""
  family = family_of(model.name)
  _, presets = FAMILIES[family]
  overrides = {k: v for k, v in model.items() if k not in _RUN_KEYS}
  if not overrides.get('vocab_size', 1):
    del overrides['vocab_size']  # 0: the tokenizer's vocabulary (base_config's default)
  cfg = _replace(presets[model.name], overrides, family)
  fields = data_fields(family, task, info, data)
  if family == 'clip':
    # Two towers: the image size goes to the vision tower; the text tower takes the tokenizer's
    # vocabulary and the id it pools at (the first end-of-text token).
    vision = dataclasses.replace(cfg.vision_config, image_size=int(data.image_size))
    text_fields = {}
    tok = info.tokenizer
    if tok is not None:
      text_fields = {'vocab_size': int(tok.vocab_size), 'eos_token_id': int(tok.eos_id),
                     'bos_token_id': int(tok.bos_id if tok.bos_id is not None else tok.eos_id),
                     'pad_token_id': int(tok.pad_id if tok.pad_id is not None else 0)}
    text_cfg = dataclasses.replace(cfg.text_config, **text_fields)
    if data.seq_len > text_cfg.max_position_embeddings:
      raise ValueError(f'config.data.seq_len {data.seq_len} exceeds the CLIP text tower\'s '
                       f'max_position_embeddings {text_cfg.max_position_embeddings}.')
    return family, dataclasses.replace(cfg, vision_config=vision, text_config=text_cfg)
  if family in ('bert', 'gpt2'):
    vocab = fields.get('vocab_size')
    if vocab and 'vocab_size' in overrides:
      # A larger config.model.vocab_size pads the tokenizer's vocabulary (nanoGPT pads to a
      # multiple of 64 for speed; also a way to size the embedding like a real checkpoint's).
      if overrides['vocab_size'] < vocab:
        raise ValueError(f'config.model.vocab_size {overrides["vocab_size"]} is smaller than the '
                         f'tokenizer\'s vocabulary ({vocab}): raise it or leave it unset.')
      fields['vocab_size'] = int(overrides['vocab_size'])
    cfg = _replace(cfg, fields, family)
    if data.seq_len > cfg.max_position_embeddings:
      raise ValueError(f'config.data.seq_len {data.seq_len} exceeds the model\'s '
                       f'max_position_embeddings {cfg.max_position_embeddings}; set '
                       'config.model.max_position_embeddings or a shorter seq_len.')
    return family, cfg
  return family, _replace(cfg, fields, family)


def dtype_of(model: ml_collections.ConfigDict):
  name = model.get('dtype', 'float32')
  if name not in DTYPES:
    raise ValueError(f'Unknown config.model.dtype {name!r}; choose one of {sorted(DTYPES)}.')
  return DTYPES[name]


def layer_stack_of(model: ml_collections.ConfigDict, family: str) -> layers.LayerStack:
  """config.model.remat / scan_layers as the transformer families' LayerStack."""
  stack = layers.LayerStack(remat=model.get('remat', 'none'),
                            scan=bool(model.get('scan_layers', False)))
  if family == 'resnet' and stack != layers.LayerStack():
    raise ValueError('config.model.remat and scan_layers apply to transformer stacks; ResNet has '
                     'none: leave them at their defaults.')
  return stack


def build_model(model: ml_collections.ConfigDict, task: str, info, data) -> tuple[nn.Module, str]:
  """(module, family) for training `task` from scratch with config.model."""
  family, cfg = model_config(model, task, info, data)
  cls, _ = FAMILIES[family]
  kwargs = {'dtype': dtype_of(model)}
  stack = layer_stack_of(model, family)
  if family != 'resnet':
    kwargs['layer_stack'] = stack
  if model.get('zero_init_residual', False):
    if family != 'resnet':
      raise ValueError('config.model.zero_init_residual starts ResNet\'s residual blocks at the '
                       f'identity; a {family} model has no such blocks: leave it unset.')
    kwargs['zero_init_residual'] = True
  head = head_for(family, task)
  if family != 'clip':
    kwargs['head'] = head
  return cls(cfg, **kwargs), family


def model_inputs(family: str, batch: dict) -> dict:
  """The module's keyword inputs from a batch of the pipeline."""
  if family in ('vit', 'resnet'):
    return {'pixel_values': batch['image']}
  if family == 'clip':
    return {'input_ids': batch['input_ids'], 'attention_mask': batch['attention_mask'],
            'pixel_values': batch['image']}
  inputs = {'input_ids': batch['input_ids']}
  if 'attention_mask' in batch:
    inputs['attention_mask'] = batch['attention_mask']
  if family == 'bert' and 'token_type_ids' in batch:
    inputs['token_type_ids'] = batch['token_type_ids']
  return inputs
