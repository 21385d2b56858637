"""Which parameters train and at what rate: treatments over '/'-joined parameter paths.

A treatment is a learning-rate multiplier per parameter leaf: 0.0 = frozen (no gradient, no
optimizer state, bit-identical after training), 1.0 = the configured rate, anything else a scaled
rate. `treatments(params, adapt_config, family)` computes them from the method's defaults, the
layer-wise decay and the user's rules; `split` / `combine` separate the trainable leaves from the
frozen ones, so that the train step differentiates only the trainable partition.

Layer groups (for discriminative rates and gradual unfreezing) come from the paths: transformer
blocks `layer_<i>`, ResNet stages `stage_<i>_block_<j>`. depth 0 is the top (head, final norms,
pooler, projections), block i of L has depth L - i, and the embeddings (token, position, patch,
ResNet stem) are the deepest group, L + 1.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ptm_jax.adapt import config as adapt_config_lib

SEP = '/'
# The family's own head (trained by every method unless a rule says otherwise). GPT-2's LM head is
# tied to the embeddings and CLIP has none: nothing is a head there by default.
FAMILY_HEADS = {'vit': r'^classifier/', 'resnet': r'^classifier/', 'bert': r'^classifier/',
                'gpt2': r'$^', 'clip': r'$^'}
_LOW_RANK_PARAMS = r'/(lora_a|lora_b|dora_magnitude)$'
_LAYER_NORMS = r'(^|/)(ln_[^/]*|[^/]*_ln|[^/]*layer_?norm[^/]*|pre_layrnorm|norm)/(scale|bias)$'
_METHOD_TRAINS = {
    'full': r'.',
    'gradual_unfreeze': r'.',
    'frozen': r'$^',
    'lora': _LOW_RANK_PARAMS, 'dora': _LOW_RANK_PARAMS, 'qlora': _LOW_RANK_PARAMS,
    'adapter': r'/adapter_[^/]*$|' + _LAYER_NORMS,
    'prefix': r'(^|/)prefix_encoder/|/prefix_(key|value)$',   # the MLP, or per-layer prefixes
    'prompt': r'(^|/)prompt$',
}
_GROUP = re.compile(r'(?:^|/)(?:layer_|stage_)(\d+)(?:/|_block)')
# (CLIP vision's pre-LayerNorm normalises the embeddings, below every block: their group.)
_EMBEDDING = re.compile(r'embed|wte|wpe|stem|cls_token|class_embedding|position|patch|'
                        r'pre_laye?rnorm')


def flatten(tree) -> dict[str, Any]:
  """{'/'-joined path: leaf} of a nested dict of parameters."""
  return {SEP.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split(SEP)): v for k, v in flat.items()})


def layer_depths(paths) -> dict[str, int]:
  """path -> depth of its layer group: 0 at the top, L + 1 for the embeddings."""
  indices = {p: int(m.group(1)) for p in paths if (m := _GROUP.search(p))}
  num_groups = max(indices.values()) + 1 if indices else 0
  depths = {}
  for p in paths:
    if p in indices:
      depths[p] = num_groups - indices[p]
    elif _EMBEDDING.search(p):
      depths[p] = num_groups + 1
    else:
      depths[p] = 0
  return depths


def treatments(params, adapt_config: ml_collections.ConfigDict, family: str) -> dict[str, float]:
  """path -> learning-rate multiplier (0.0 = frozen) for every leaf of `params`."""
  config = adapt_config_lib.merged_config(adapt_config)
  flat = flatten(params)
  head = re.compile(config.head or FAMILY_HEADS.get(family, r'$^'))
  trains = re.compile(_METHOD_TRAINS[config.method])
  depths = layer_depths(flat)
  if config.method == 'full' and config.layer_lr_decay != 1.0:
    if any('/layers/' in f'/{p}' for p in flat):
      raise ValueError('config.adapt.layer_lr_decay needs the blocks as layer_0 ... layer_N; '
                       'the scanned stack stacks them: set config.model.scan_layers=False.')
  out = {}
  for path, leaf in flat.items():
    rate = 1.0 if (trains.search(path) or head.search(path)) else 0.0
    if rate and config.method == 'full':
      rate = config.layer_lr_decay ** depths[path]
    for pattern, treatment in config.rules:
      if re.search(pattern, path):
        rate = {'freeze': 0.0, 'train': 1.0}.get(treatment, treatment)
        break
    rate = float(rate)
    if rate < 0:
      raise ValueError(f'Learning-rate multiplier {rate} for {path} is negative.')
    if rate and not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(f'{path} is stored as {leaf.dtype} (a quantised frozen weight) and cannot '
                       'train: change the rule that makes it trainable.')
    out[path] = rate
  if not any(out.values()):
    raise ValueError(f'config.adapt.method={config.method!r} with rules {config.rules} trains no '
                     'parameter: add a rule (e.g. (r"^classifier/", "train")) or set '
                     'config.adapt.head.')
  return out


def split(params, rates: dict[str, float]) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts holding the leaves with rate > 0 and = 0."""
  flat = flatten(params)
  trainable = {p: v for p, v in flat.items() if rates[p] > 0}
  frozen = {p: v for p, v in flat.items() if rates[p] == 0}
  return unflatten(trainable), unflatten(frozen)


def combine(trainable, frozen) -> dict:
  """The full parameter tree from the two partitions of `split`."""
  return unflatten({**flatten(frozen), **flatten(trainable)})


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _logical_count(path: str, leaf, flat: dict) -> int:
  """Parameters a leaf stands for: an NF4 kernel (QLoRA) counts the elements of the kernel it
  replaced, (..., in) x out as its LoRA branch's A (..., in, r) and B (..., r, out) give them;
  its block scales count none."""
  module, _, name = path.rpartition(SEP)
  if name == 'nf4_codes':
    a, b = flat.get(f'{module}{SEP}lora_a'), flat.get(f'{module}{SEP}lora_b')
    if a is not None and b is not None:
      return int(np.prod(a.shape[:-1])) * int(b.shape[-1])
    return 2 * int(np.prod(leaf.shape))  # two codes a byte (one of them padding if n is odd)
  return 0 if name.startswith('nf4_') else int(np.prod(leaf.shape))


def report(rates: dict[str, float], params) -> dict:
  """{'total_params', 'trainable_params', 'trainable_percent'}: parameters, not stored bytes
  (an NF4 kernel counts its elements)."""
  flat = flatten(params)
  total = sum(_logical_count(p, v, flat) for p, v in flat.items())
  trainable = count({p: v for p, v in flat.items() if rates[p] > 0})
  return {'total_params': total, 'trainable_params': trainable,
          'trainable_percent': 100.0 * trainable / max(total, 1)}


def unfreeze_steps(params, depths: dict[str, int], every: int) -> dict:
  """Gradual unfreezing: the step at which each trainable leaf starts to train.

  Group depth d (0 = the head) unfreezes at step d * every: ULMFiT's one group per epoch, from
  the top down.
  """
  return unflatten({p: d * every for p, d in depths.items() if p in flatten(params)})


def rate_transform(rates, start_steps=None) -> 'optax.GradientTransformation':
  """Per-leaf learning-rate multipliers (and gradual-unfreezing start steps) as optax stages.

  Returns (before, after): `before` zeroes the gradients of leaves that have not started yet (so
  that they count in no global-norm clipping; the optimizer in between should give each start
  step's leaves a state of their own that starts there, as `optimizers.make_optimizer`'s
  start_steps does, or a late group's first Adam steps are bias-corrected as step S's); `after`
  scales each update by its multiplier and zeroes it before the leaf's start step, so a leaf
  that is not yet unfrozen stays bit-identical (weight decay included). Chain them around the
  optimizer: optax.chain(before, optimizer, after). Multiplying the update by m is lr x m for
  every optax optimizer whose update is linear in the learning rate (all of ptm_jax's).

  rates, start_steps: trees shaped like the trainable parameters (floats, ints).
  """
  import optax  # the rules above need no optax

  def started(step, start):
    return step >= start

  def before_update(updates, state, params=None):
    del params
    if start_steps is not None:
      updates = jax.tree.map(lambda u, s: jnp.where(started(state.count, s), u, 0.0).astype(
          u.dtype), updates, start_steps)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  def after_update(updates, state, params=None):
    del params
    updates = jax.tree.map(lambda u, r: u * jnp.asarray(r, u.dtype) if r != 1.0 else u,
                           updates, rates)
    if start_steps is not None:
      updates = jax.tree.map(lambda u, s: jnp.where(started(state.count, s), u, 0.0).astype(
          u.dtype), updates, start_steps)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  init = lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
  return (optax.GradientTransformation(init, before_update),
          optax.GradientTransformation(init, after_update))
