"""LoRA-family parameters out to the formats the PyTorch world loads.

  save_adapter(module, params, adapt_config, 'out/adapter')   # huggingface peft's LoRA layout
  save_merged(module, params, adapt_config, 'out/merged')     # a plain transformers checkpoint

then, in PyTorch:

  base = transformers.AutoModelForCausalLM.from_pretrained(BASE)   # the run's init checkpoint
  model = peft.PeftModel.from_pretrained(base, 'out/adapter')      # = ptm_jax's adapted model
  merged = transformers.AutoModelForCausalLM.from_pretrained('out/merged')   # the same logits

The adapter folder holds adapter_model.safetensors and adapter_config.json as peft 0.21.2 writes
them. Each adapted layer of ours (module path 'transformer/layer_0/attention/query') is named as
transformers names the module whose weight it adapts ('transformer.h.0.attn.c_attn'), found
through the family's checkpoint rules (ptm_jax.hub.<family>), and written as

  base_model.model.<module>.lora_A.weight           (r, in)      Linear and GPT-2's Conv1D
  base_model.model.<module>.lora_B.weight           (out, r)
  base_model.model.<module>.lora_magnitude_vector   (out,)       DoRA
  base_model.model.<module>.lora_A.weight           (r, in, kh, kw)   Conv2d
  base_model.model.<module>.lora_B.weight           (out, r, 1, 1)
  base_model.model.<module>.lora_embedding_A        (r, num_embeddings)   Embedding
  base_model.model.<module>.lora_embedding_B        (dim, r)

Fused checkpoint weights. GPT-2's c_attn is one Conv1D (D, 3D) where we have separate query, key
and value Dense layers. Their k adapted parts (k = 1..3, rank r each) become one c_attn LoRA of
rank k r: lora_A stacks the parts' A (k r, D), lora_B is block structured (3D, k r) with part i's
B in rows of its outputs and columns i r .. (i+1) r, zeros elsewhere (an unadapted part's outputs
get an all-zero row). Then B_fused A_fused restricted to a part's outputs is exactly that part's
B A, and rank_pattern / alpha_pattern give c_attn rank k r and alpha k alpha (rsLoRA:
sqrt(k) alpha), so PEFT's scale alpha / r (alpha / sqrt(r)) is the same number for every branch.
DoRA's magnitude of an unadapted part is its base column norm (a rescale by 1). The layout of
every weight (torch Linear (out, in), Conv1D (in, out) = PEFT's fan_in_fan_out, which columns of
a fused weight are which part's) is read off the rule itself by converting index-coded arrays,
so no family's layout is restated here.

Scanned stacks (parameters under 'layers' with a leading (num_layers,) axis) are unstacked
first. QLoRA exports its LoRA weights exactly as LoRA does; the base stays the original
transformers checkpoint, so peft applies them over the full-precision base weights, and its
outputs differ from the QLoRA model's by the NF4 quantisation error of the frozen kernels (and
by QLoRA's compute dtype).

Trained parameters other than the low-rank ones (a classifier head, or whatever the user's
rules train) go into PEFT's modules_to_save: adapter_config.json names their modules, and their
whole tensors (trained or not) are stored under base_model.model.<module>.<weight|bias>, which
peft 0.21.2 loads into its trainable copy of the module. Two cases PEFT cannot express are
refused with an error: a module that has both a LoRA branch and trained base weights, and a
trained input embedding that a decoder is tied to. `save_merged` covers both.
"""

import json
import logging
import math
import os
import re

import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy

from ptm_jax.adapt import config as adapt_config_lib
from ptm_jax.adapt import lora
from ptm_jax.adapt import methods
from ptm_jax.adapt import rules as adapt_rules
from ptm_jax.hub import convert
from ptm_jax.hub import pretrained
from ptm_jax.models import layers

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = 'adapter_model.safetensors'
ADAPTER_CONFIG = 'adapter_config.json'
_LOW_RANK_LEAVES = ('lora_a', 'lora_b', 'dora_magnitude')
_PEFT_PREFIX = 'base_model.model.'
# PEFT's task types, by (family, head): they pick the PeftModel class that wraps the base.
_TASK_TYPES = {
    ('gpt2', None): 'FEATURE_EXTRACTION', ('gpt2', 'lm'): 'CAUSAL_LM',
    ('bert', None): 'FEATURE_EXTRACTION', ('bert', 'sequence_classification'): 'SEQ_CLS',
    ('bert', 'token_classification'): 'TOKEN_CLS',
}
# Input embeddings that a decoder reads too (tied weights), per (family, head): training them
# outside LoRA cannot go through modules_to_save, whose copy the decoder would not see.
_TIED_EMBEDDINGS = {('gpt2', 'lm'): 'wte', ('bert', 'mlm'): 'word_embeddings',
                    ('bert', 'pretraining'): 'word_embeddings'}


def unsupported(module: nn.Module) -> str | None:
  """Why `module` has no transformers form (e.g. GPT-2 with use_bias=False), or None."""
  try:
    family = pretrained.family_for_module(module)
    convert.config_to_hf(module.config)
    family.rules(module.config, getattr(module, 'head', None))  # e.g. ViT without a class token
  except ValueError as e:
    return str(e)
  return None


def _plain_tree(tree) -> dict:
  """Unboxed numpy arrays, scanned stacks unstacked to layer_0 ... layer_{n-1}."""
  tree = jax.tree.map(np.asarray, nn.unbox(tree))
  tree = adapt_rules.unflatten(adapt_rules.flatten(tree))  # plain dicts (no FrozenDict)
  return layers.unstack_layers(tree)


def _layer_paths(path: str, flat: dict) -> list[str]:
  """A path of the scanned tree ('.../layers/...') as its paths in the unstacked one."""
  if '/layers/' not in f'/{path}/':
    return [path]
  head, _, tail = f'/{path}'.partition('/layers/')
  prefix = head[1:] + '/' if head else ''
  out = []
  i = 0
  while f'{prefix}layer_{i}/{tail}' in flat:
    out.append(f'{prefix}layer_{i}/{tail}')
    i += 1
  return out


class _Rules:
  """The family's checkpoint rules, looked up by our '/'-joined parameter paths."""

  def __init__(self, module: nn.Module):
    self.family = pretrained.family_for_module(module)
    self.head = getattr(module, 'head', None)
    self.by_path = {}
    for rule in self.family.rules(module.config, self.head):
      for index, path in enumerate(rule.paths):
        if path[0] == 'params':
          self.by_path['/'.join(path[1:])] = (rule, index)

  def find(self, path: str) -> tuple[convert.Rule, int]:
    try:
      return self.by_path[path]
    except KeyError:
      raise ValueError(f'{path} has no tensor in a {self.family.name} transformers checkpoint '
                       f'(head {self.head!r}), so PEFT cannot name it.') from None


# transformers 5 renamed some families' modules but kept their checkpoint keys (converted on
# load); PEFT names modules as the instantiated model has them. These mirror transformers
# 5.24's ViT conversion mapping (regexes applied in order); GPT-2, BERT, CLIP and ResNet keep
# their checkpoint names.
_MODULE_RENAMES = {
    'vit': ((r'encoder\.layer\.', 'layers.'), (r'attention\.query', 'q_proj'),
            (r'attention\.key', 'k_proj'), (r'attention\.value', 'v_proj'),
            (r'attention\.output\.dense', 'attention.o_proj'),
            (r'intermediate\.dense', 'mlp.fc1'), (r'output\.dense', 'mlp.fc2')),
}


def _module_name(rule: convert.Rule, family: str) -> str:
  """The transformers module whose parameter `rule` writes: 'h.0.attn.c_attn.weight' -> ..."""
  name = rule.key.rsplit('.', 1)[0]
  for pattern, replacement in _MODULE_RENAMES.get(family, ()):
    name = re.sub(pattern, replacement, name)
  return name


def _dense_layout(rule: convert.Rule, shapes: list[tuple[int, int]]):
  """How the rule lays our (in, out_i) kernels into the transformers weight.

  Converts index-coded kernels (entry (i, j) of part p holds a unique integer) and decodes the
  result. Returns (fan_in_fan_out, part (O,), column (O,)): whether the weight is stored
  (in, O) as GPT-2's Conv1D (else (O, in) as torch's Linear), and for each of its O outputs the
  part and that part's output column it is.
  """
  if len({s[0] for s in shapes}) != 1:
    raise ValueError(f'{rule.key}: parts with different input sizes {shapes} cannot be fused.')
  sizes = [s[0] * s[1] for s in shapes]
  offsets = np.cumsum([0] + sizes)
  codes = tuple(offsets[p] + np.arange(sizes[p], dtype=np.float64).reshape(shapes[p])
                for p in range(len(shapes)))
  hf = np.asarray(rule.to_hf(codes))
  fan_in = shapes[0][0]
  if hf.ndim != 2 or not np.array_equal(np.sort(hf.ravel()), np.arange(offsets[-1])):
    raise ValueError(f'{rule.key}: the checkpoint tensor {hf.shape} is not a rearrangement of '
                     f'the kernels {shapes}; PEFT export does not know this layout.')
  codes_hf = hf.astype(np.int64)
  part = np.searchsorted(offsets, codes_hf, side='right') - 1
  local = codes_hf - offsets[part]
  out_sizes = np.asarray([s[1] for s in shapes])
  row, column = local // out_sizes[part], local % out_sizes[part]
  # As (O, in): torch Linear as stored, Conv1D transposed.
  candidates = []
  if hf.shape[1] == fan_in:
    candidates.append((False, part, column, row))
  if hf.shape[0] == fan_in:
    candidates.append((True, part.T, column.T, row.T))
  for fan_in_fan_out, p, c, i in candidates:
    if (np.all(i == np.arange(fan_in)[None, :]) and np.all(p == p[:, :1])
        and np.all(c == c[:, :1])):
      return fan_in_fan_out, p[:, 0], c[:, 0]
  raise ValueError(f'{rule.key}: the checkpoint tensor {hf.shape} mixes input and output '
                   f'features of the kernels {shapes}; PEFT export does not know this layout.')


def _check_layout(rule: convert.Rule, shape, expected, what: str):
  codes = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
  hf = np.asarray(rule.to_hf((codes,)))
  if not np.array_equal(hf, expected(codes)):
    raise ValueError(f'{rule.key}: not the usual torch {what} layout; PEFT export does not know '
                     'this layout.')


def _low_rank_tensors(flat: dict, lookup: _Rules, spec) -> tuple[dict, dict, dict, bool, list]:
  """(tensors, rank_pattern, alpha_pattern, fan_in_fan_out, target module names)."""
  modules = sorted(p[:-len('/lora_a')] for p in flat if p.endswith('/lora_a'))
  groups: dict[str, dict] = {}  # rule key -> {'rule', 'parts': {index: our module}, 'kind'}
  for m in modules:
    if f'{m}/embedding' in lookup.by_path:
      kind, leaf = 'embed', 'embedding'
    else:
      kind, leaf = ('conv' if flat[f'{m}/lora_a'].ndim == 4 else 'dense'), 'kernel'
    rule, index = lookup.find(f'{m}/{leaf}')
    if not rule.key.endswith('.weight'):
      raise ValueError(f'{m}: its checkpoint tensor {rule.key} is not a module weight.')
    group = groups.setdefault(rule.key, {'rule': rule, 'parts': {}, 'kind': kind})
    group['parts'][index] = m

  tensors, rank_pattern, alpha_pattern = {}, {}, {}
  layouts = set()
  for key, group in groups.items():
    rule, parts, kind = group['rule'], group['parts'], group['kind']
    name = _module_name(rule, lookup.family.name)
    prefix = f'{_PEFT_PREFIX}{name}'
    if kind == 'embed':
      a, b = flat[f'{parts[0]}/lora_a'], flat[f'{parts[0]}/lora_b']  # (num, r), (r, dim)
      _check_layout(rule, a.shape[:1] + b.shape[1:], lambda c: c, 'Embedding')
      tensors[f'{prefix}.lora_embedding_A'] = a.T
      tensors[f'{prefix}.lora_embedding_B'] = b.T
      continue
    if kind == 'conv':
      a, b = flat[f'{parts[0]}/lora_a'], flat[f'{parts[0]}/lora_b']  # (kh, kw, in, r), (r, out)
      _check_layout(rule, a.shape[:-1] + b.shape[1:], lambda c: c.transpose(3, 2, 0, 1),
                    'Conv2d')
      tensors[f'{prefix}.lora_A.weight'] = a.transpose(3, 2, 0, 1)
      tensors[f'{prefix}.lora_B.weight'] = b.T[:, :, None, None]
      continue
    # Dense: one part, or several fused into one checkpoint weight.
    part_paths = ['/'.join(p[1:]) for p in rule.paths]
    shapes = []
    for index, path in enumerate(part_paths):
      if index in parts:
        m = parts[index]
        shapes.append((flat[f'{m}/lora_a'].shape[0], flat[f'{m}/lora_b'].shape[1]))
      elif path in flat:
        shapes.append(tuple(flat[path].shape))
      else:
        raise ValueError(f'{path} (fused into {rule.key} with an adapted layer) is missing.')
    fan_in_fan_out, part_of, column_of = _dense_layout(rule, shapes)
    layouts.add(fan_in_fan_out)
    adapted = sorted(parts)
    r = spec.rank
    a_stack = np.concatenate([flat[f'{parts[i]}/lora_a'].T for i in adapted], axis=0)
    b_blocks = np.zeros((len(part_of), r * len(adapted)), a_stack.dtype)
    for slot, i in enumerate(adapted):
      rows = part_of == i
      b_blocks[rows, slot * r:(slot + 1) * r] = flat[f'{parts[i]}/lora_b'].T[column_of[rows]]
    tensors[f'{prefix}.lora_A.weight'] = a_stack
    tensors[f'{prefix}.lora_B.weight'] = b_blocks
    if spec.method == 'dora':
      magnitude = np.zeros(len(part_of), np.float32)
      for i, path in enumerate(part_paths):
        rows = part_of == i
        if i in parts:
          magnitude[rows] = flat[f'{parts[i]}/dora_magnitude'][column_of[rows]]
        else:  # unadapted: m = ||W0||_c makes DoRA's rescale 1
          norms = np.linalg.norm(flat[path].astype(np.float64), axis=0)
          magnitude[rows] = norms[column_of[rows]]
      tensors[f'{prefix}.lora_magnitude_vector'] = magnitude
    k = len(adapted)
    if k > 1:
      rank_pattern[name] = k * r
      alpha_pattern[name] = spec.alpha * (math.sqrt(k) if spec.rslora else k)
  if spec.method == 'dora' and any(g['kind'] != 'dense' for g in groups.values()):
    raise ValueError('DoRA adapts Dense layers only.')  # lora.py refuses it before this
  targets = sorted(_module_name(g['rule'], lookup.family.name) for g in groups.values())
  return tensors, rank_pattern, alpha_pattern, True in layouts, targets


def _modules_to_save(params: dict, flat: dict, adapt_config, lookup: _Rules,
                     targets: list[str]) -> tuple[dict, list[str]]:
  """(tensors, module names) of the modules whose base weights the run trained."""
  rates = adapt_rules.treatments(params, adapt_config, lookup.family.name)
  trained = [p for path, rate in rates.items() if rate > 0
             and path.rsplit('/', 1)[-1] not in _LOW_RANK_LEAVES
             for p in _layer_paths(path, flat)]
  names = sorted({_module_name(lookup.find(p)[0], lookup.family.name) for p in trained})
  tied = _TIED_EMBEDDINGS.get((lookup.family.name, lookup.head))
  for name in names:
    if name in targets:
      raise ValueError(
          f'The run trained both a LoRA branch and base weights of {name}; a PEFT adapter '
          'holds one or the other. Freeze those base weights with a config.adapt.rules entry, '
          'or use the merged export.')
    if tied and name.rsplit('.', 1)[-1] == tied:
      raise ValueError(
          f'The run trained {name}, which the {lookup.family.name} {lookup.head!r} head reads '
          'as its tied decoder too; PEFT modules_to_save would untie them. Freeze it with a '
          'config.adapt.rules entry, or use the merged export.')
  tensors = {}
  for rule in {id(r): r for r, _ in lookup.by_path.values()}.values():
    name = _module_name(rule, lookup.family.name)
    if name in names:
      arrays = tuple(flat['/'.join(p[1:])] for p in rule.paths)
      tensors[f'{_PEFT_PREFIX}{name}.{rule.key.rsplit(".", 1)[1]}'] = np.asarray(
          rule.to_hf(arrays))
  return tensors, names


def _check_branches(flat: dict, spec: lora.LowRank):
  """Refuses low-rank leaves that `spec` (config.adapt) does not describe.

  Another run's config would go unnoticed otherwise: branches of another rank would be scaled
  by that config's alpha / r (a silently wrong merge), DoRA magnitudes under method 'lora' would
  be left out of both exports.
  """
  ranks = sorted({int(v.shape[-1]) for p, v in flat.items() if p.endswith('/lora_a')})
  if not ranks:
    raise ValueError('The parameters hold no LoRA branch (lora_a / lora_b): pass the adapted '
                     'tree, e.g. rules.combine(trainable, frozen) of the run.')
  if ranks != [spec.rank]:
    raise ValueError(f'The parameters hold LoRA branches of rank {", ".join(map(str, ranks))} '
                     f'but config.adapt.lora.rank is {spec.rank}, so their scale alpha / r '
                     '(rsLoRA: alpha / sqrt(r)) would be wrong: pass the config.adapt of the run '
                     'that trained them.')
  has_magnitude = any(p.endswith('/dora_magnitude') for p in flat)
  if has_magnitude != (spec.method == 'dora'):
    raise ValueError(f'config.adapt.method is {spec.method!r} but the parameters '
                     f'{"hold" if has_magnitude else "lack"} DoRA magnitudes (dora_magnitude): '
                     'pass the config.adapt of the run that trained them.')


def adapter_tensors(module: nn.Module, params, adapt_config) -> tuple[dict, dict]:
  """(safetensors dict, adapter_config.json dict without the base model's name)."""
  config = adapt_config_lib.merged_config(adapt_config)
  if config.method not in adapt_config_lib.LOW_RANK:
    raise ValueError(f'PEFT export is for the LoRA family {adapt_config_lib.LOW_RANK}; '
                     f'config.adapt.method is {config.method!r}.')
  reason = unsupported(module)
  if reason:
    raise ValueError(f'No transformers model for PEFT to load the adapter onto: {reason}')
  spec = lora.LowRank.from_config(config)
  params = jax.tree.map(np.asarray, nn.unbox(params))
  plain = _plain_tree(params)
  flat = adapt_rules.flatten(plain)
  _check_branches(flat, spec)
  lookup = _Rules(module)
  tensors, rank_pattern, alpha_pattern, fan_in_fan_out, targets = _low_rank_tensors(
      flat, lookup, spec)
  saved, to_save = _modules_to_save(adapt_rules.unflatten(adapt_rules.flatten(params)), flat,
                                    config, lookup, targets)
  tensors.update(saved)
  tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
  peft_config = {
      'peft_type': 'LORA',
      'task_type': _TASK_TYPES.get((lookup.family.name, lookup.head)),
      'base_model_name_or_path': None,
      'revision': None,
      'r': spec.rank,
      'lora_alpha': spec.alpha,
      'lora_dropout': spec.dropout,
      'use_rslora': spec.rslora,
      'use_dora': spec.method == 'dora',
      'target_modules': targets,
      'rank_pattern': rank_pattern,
      'alpha_pattern': alpha_pattern,
      'fan_in_fan_out': fan_in_fan_out,
      'bias': 'none',
      'modules_to_save': to_save or None,
      'init_lora_weights': True,
      'inference_mode': True,
      'layers_to_transform': None,
      'layers_pattern': None,
  }
  return tensors, peft_config


def save_adapter(module: nn.Module, params, adapt_config, out_dir: str, *,
                 base_model_name_or_path: str | None = None) -> str:
  """Writes out_dir/adapter_model.safetensors and adapter_config.json (peft's LoRA layout).

  Args:
    module: the plain (un-adapted) model; a scanned layer stack is fine.
    params: the adapted parameter tree (base + lora_a/lora_b[/dora_magnitude] or QLoRA's nf4_*
      leaves), as the trainer holds it: rules.combine(trainable, frozen).
    adapt_config: config.adapt of the run (method lora, dora or qlora).
    base_model_name_or_path: recorded in adapter_config.json (the run's init checkpoint).

  All tensors are written as float32.
  """
  tensors, peft_config = adapter_tensors(module, params, adapt_config)
  peft_config['base_model_name_or_path'] = base_model_name_or_path
  os.makedirs(out_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS),
                              metadata={'format': 'pt'})
  with open(os.path.join(out_dir, ADAPTER_CONFIG), 'w') as f:
    json.dump(peft_config, f, indent=2, sort_keys=True)
  return out_dir


def save_merged(module: nn.Module, params, adapt_config, out_dir: str, *,
                other_variables: dict | None = None) -> str:
  """Writes the adapted model with every branch folded in as a transformers checkpoint.

  other_variables: non-parameter collections (ResNet's batch_stats), saved alongside.
  QLoRA's kernels are dequantised (float32) before the delta is added. A LoRA branch on an
  input embedding that a decoder is tied to (GPT-2's wte under the LM head) changes the
  decoder once merged, as PEFT's own merge does; the adapted model's decoder reads the base
  table.

  A parameter that the checkpoint has no tensor for is refused, not dropped: the leaves of
  adapters, prefixes and prompts (computation that no base weight holds: keep the adapted tree
  and run it in methods.applied), and LoRA leaves under a config.adapt.method outside the LoRA
  family, which would not be folded in.
  """
  reason = unsupported(module)
  if reason:
    raise ValueError(f'No transformers format for this model: {reason}')
  config = adapt_config_lib.merged_config(adapt_config)
  plain = _plain_tree(params)
  if config.method in adapt_config_lib.LOW_RANK:
    _check_branches(adapt_rules.flatten(plain), lora.LowRank.from_config(config))
  lookup = _Rules(module)
  family = lookup.family
  tied = _TIED_EMBEDDINGS.get((family.name, lookup.head))
  if tied and any(p.split('/')[-2:] == [tied, 'lora_a'] for p in adapt_rules.flatten(plain)):
    log.warning('LoRA on %s, which the decoder shares: the merged model\'s decoder includes '
                'the delta, the adapted model\'s does not (as with PEFT\'s own merge).', tied)
  merged = methods.merge(plain, config)
  # save_pretrained writes the checkpoint's tensors and reads nothing else.
  unsaved = sorted(p for p in adapt_rules.flatten(merged) if p not in lookup.by_path)
  if unsaved:
    raise ValueError(
        f'{len(unsaved)} parameters have no tensor in a {family.name} transformers checkpoint, '
        f'so the merged export would drop them: {", ".join(unsaved[:4])}'
        f'{", ..." if len(unsaved) > 4 else ""}. Only LoRA-family branches fold into the base '
        f'weights (config.adapt.method lora, dora or qlora, as the run had it; here '
        f'{config.method!r}); adapters, prefixes and prompts add computation that no base '
        'weight holds: keep the adapted tree and run it inside methods.applied.')
  variables = {'params': merged}
  if other_variables:
    variables.update(_plain_tree(other_variables))
  return pretrained.save_pretrained(module, variables, out_dir)
