"""Optimizers and learning-rate schedules built from `config.optimizer` (an ml_collections dict).

The trainer names an optimizer and a schedule in its config and gets back one optax
GradientTransformation (clipping and weight decay included) and the schedule it uses, so that
the logged learning rate is the applied one.

Steps. Every step count here (total_steps, warmup_steps, decay_steps) counts optimizer updates,
i.e. parameter changes, as nanoGPT's iterations do. Update number t (0-based: the first update is
t = 0) uses the learning rate schedule(t), as nanoGPT's iteration `it` uses get_lr(it).
grad_accum_steps is read by the trainer's step (experiments/train.py), which sums the gradients
of its k micro-batches before the one update, so the optimizer always sees one gradient per
step.

Schedules (peak learning_rate, warmup over warmup_steps, then):
  constant            the peak.
  cosine              half a cosine from the peak down to min_learning_rate, reached at step
                      decay_steps (0: total_steps), then min_learning_rate. Counted from step 0,
                      warmup included, like nanoGPT's lr_decay_iters.
  linear              a straight line from the peak down to min_learning_rate at decay_steps.
  rsqrt               peak * sqrt(warmup_steps / t) after the warmup (peak / sqrt(t) with no
                      warmup): the inverse square root decay of "Attention Is All You Need".
  slanted_triangular  ULMFiT's (Howard & Ruder, 2018) over T = decay_steps (0: total_steps):
                      cut = floor(T * cut_frac); p = t / cut for t < cut, else
                      1 - (t - cut) / (cut * (1 / cut_frac - 1)); lr = peak * (1 + p * (ratio - 1))
                      / ratio. It warms up by itself (warmup_steps must be 0); p stops at 0, so
                      after T the rate stays at peak / ratio.
min_learning_rate is used by cosine and linear only. Warmup (warmup_style):
  linear_from_zero  peak * t / warmup_steps, as optax's linear warmup: the first update has rate 0.
  nanogpt           peak * (t + 1) / (warmup_steps + 1), nanoGPT's get_lr: with the cosine
                    schedule, schedule(t) is exactly nanoGPT's get_lr(t).
Called with a Python or numpy step, a schedule computes in float64 on the host (exact, for
logging and tests); called with the int32 step count inside the optimizer, in float32.

Weight decay (weight_decay > 0) decays, with weight_decay_mask '' (the default), the parameters
with ndim >= 2 (kernels and embedding tables) and leaves the 1-D ones (biases, LayerNorm scales
and offsets) alone; 'all' decays every parameter. Under a scanned stack (LayerStack(scan=True):
the blocks' parameters stacked under 'layers' with a leading (num_layers,) axis) that axis is not
counted, so a stacked bias (num_layers, D) is not decayed and the scanned model decays exactly
the looped model's parameters. The mask is a function of the parameter pytree (shapes and paths),
so the same optimizer works on abstract parameters (jax.ShapeDtypeStruct) and concrete arrays; it
expects unboxed parameters (plain arrays, not flax nn.Partitioned boxes). How each optimizer
decays:
  adamw, lamb, adafactor  decoupled: the parameters shrink by lr_t * weight_decay * param each
                          update, on top of the optimizer's step (torch.optim.AdamW's rule; in
                          LAMB the decay joins the step before the trust ratio, as the paper does).
  adam, sgd               L2: weight_decay * param is added to the gradient (torch.optim.Adam's
                          and SGD's weight_decay).

nesterov turns on Nesterov momentum for sgd (momentum > 0) and NAdam(W) for adam and adamw (with
any other optimizer it is an error). b1 and b2 are in [0, 1). adafactor takes
optax's defaults (factored second moments, update clipping at 1, parameter-scaled steps, no
momentum) and ignores b1, b2 and eps. grad_clip_norm > 0 clips the (accumulated) gradient to that
global norm before anything else.
"""

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

NAMES = ('adamw', 'adam', 'sgd', 'lamb', 'adafactor')
SCHEDULES = ('constant', 'cosine', 'linear', 'rsqrt', 'slanted_triangular')
WARMUP_STYLES = ('linear_from_zero', 'nanogpt')
WEIGHT_DECAY_MASKS = ('', 'all')
# Schedules that decay to min_learning_rate at decay_steps.
_DECAYING = ('cosine', 'linear')
# The optimizers whose weight decay is decoupled from the gradient; the others add L2 to it.
_DECOUPLED = ('adamw', 'lamb', 'adafactor')

ConfigLike = ml_collections.ConfigDict | Mapping[str, Any] | None


def default_config() -> ml_collections.ConfigDict:
  """Every `config.optimizer` key with its default; experiment configs override what they need."""
  c = ml_collections.ConfigDict()
  c.name = 'adamw'                  # one of NAMES
  c.learning_rate = 1e-3            # the peak learning rate
  c.schedule = 'constant'           # one of SCHEDULES
  c.warmup_steps = 0
  c.warmup_style = 'linear_from_zero'   # one of WARMUP_STYLES
  c.min_learning_rate = 0.0         # where cosine and linear decay end
  c.decay_steps = 0                 # step where the decay ends (slanted: T); 0 = total_steps
  # Adam, AdamW, LAMB.
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0
  c.weight_decay_mask = ''          # '' = ndim >= 2 (scan's layer axis not counted); 'all' = all
  # SGD.
  c.momentum = 0.9                  # 0 = plain SGD
  c.nesterov = False                # also NAdam(W) for adam and adamw
  # Gradients.
  c.grad_clip_norm = 0.0            # 0 = no clipping; else the largest global norm
  c.grad_accum_steps = 1            # micro-batches per update (accumulated in the train step)
  # Slanted triangular (ULMFiT).
  c.cut_frac = 0.1                  # fraction of the steps spent increasing
  c.ratio = 32.0                    # peak / lowest learning rate
  return c


def merged_config(optimizer_config: ConfigLike) -> ml_collections.ConfigDict:
  """`optimizer_config` over the defaults, checked: unknown keys and bad values fail loudly.

  Accepts a ConfigDict, a plain mapping, or None (all defaults). Checks what does not depend on
  the number of steps; make_schedule checks the rest.
  """
  out = default_config()
  given = {} if optimizer_config is None else optimizer_config
  unknown = sorted(set(given.keys()) - set(out.keys()))
  if unknown:
    raise ValueError(f'Unknown config.optimizer key(s) {unknown}; known keys: '
                     f'{sorted(out.keys())}.')
  out.update(given)
  for key, allowed in (('name', NAMES), ('schedule', SCHEDULES), ('warmup_style', WARMUP_STYLES),
                       ('weight_decay_mask', WEIGHT_DECAY_MASKS)):
    if out[key] not in allowed:
      raise ValueError(f'config.optimizer.{key} {out[key]!r} is not one of {allowed}.')
  for key in ('learning_rate', 'min_learning_rate', 'warmup_steps', 'decay_steps', 'eps',
              'weight_decay', 'momentum', 'grad_clip_norm'):
    if out[key] < 0:
      raise ValueError(f'config.optimizer.{key} must be >= 0, got {out[key]}.')
  for key in ('b1', 'b2'):
    if not 0.0 <= out[key] < 1.0:
      raise ValueError(f'config.optimizer.{key} must be in [0, 1), got {out[key]} (at 1 the '
                       "moment never forgets and Adam's bias correction divides by 0).")
  if out.nesterov and (out.name in ('lamb', 'adafactor') or
                       (out.name == 'sgd' and not out.momentum)):
    what = 'sgd without momentum' if out.name == 'sgd' else f'{out.name} (no Nesterov form)'
    raise ValueError(f'config.optimizer.nesterov is True but {what} would silently ignore it: '
                     'set nesterov=False, or use sgd with momentum > 0, adam or adamw (NAdam).')
  if out.min_learning_rate > out.learning_rate:
    raise ValueError(f'config.optimizer.min_learning_rate ({out.min_learning_rate}) is above the '
                     f'peak learning_rate ({out.learning_rate}).')
  if out.grad_accum_steps < 1:
    raise ValueError('config.optimizer.grad_accum_steps must be >= 1 (1 = no accumulation), got '
                     f'{out.grad_accum_steps}.')
  if not 0.0 < out.cut_frac < 1.0:
    raise ValueError(f'config.optimizer.cut_frac must be in (0, 1), got {out.cut_frac}.')
  if out.ratio < 1.0:
    raise ValueError(f'config.optimizer.ratio must be >= 1, got {out.ratio}.')
  return out


def _check_total_steps(config: ml_collections.ConfigDict, total_steps: int) -> None:
  """The checks that need the number of optimizer updates."""
  if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)):
    raise TypeError(f'total_steps must be an int (optimizer updates), got {total_steps!r}.')
  if total_steps < 1:
    raise ValueError(f'total_steps must be >= 1, got {total_steps}.')
  if config.warmup_steps > total_steps:
    raise ValueError(f'config.optimizer.warmup_steps ({config.warmup_steps}) is more than '
                     f'total_steps ({total_steps}): lower the warmup or train longer.')
  decay_steps = config.decay_steps or total_steps
  if config.schedule in _DECAYING and decay_steps <= config.warmup_steps:
    raise ValueError(f'The {config.schedule} decay ends at step {decay_steps} (decay_steps, 0 = '
                     f'total_steps), not after the warmup of {config.warmup_steps} steps: raise '
                     'decay_steps or lower warmup_steps.')
  if config.schedule == 'slanted_triangular':
    if config.warmup_steps:
      raise ValueError('The slanted_triangular schedule warms up by itself over cut_frac of the '
                       f'steps: set warmup_steps to 0 (got {config.warmup_steps}).')
    if math.floor(decay_steps * config.cut_frac) < 1:
      raise ValueError(f'slanted_triangular over {decay_steps} steps with cut_frac '
                       f'{config.cut_frac} increases for 0 steps: raise cut_frac or the steps.')


def _on_host(step) -> bool:
  """True for a Python or numpy step (computed in float64), False for jax arrays and tracers."""
  return isinstance(step, (int, float, np.integer, np.floating, np.ndarray))


def make_schedule(config: ConfigLike, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule of `config` (see the module docstring) over total_steps updates.

  Returns a function of the 0-based optimizer step: a float64 numpy scalar for a Python or numpy
  step, a float32 jax scalar for a jax int step (as inside the optimizer, under jit).
  """
  config = merged_config(config)
  _check_total_steps(config, total_steps)
  peak = config.learning_rate
  low = config.min_learning_rate
  warmup = config.warmup_steps
  decay_steps = config.decay_steps or total_steps
  cut = math.floor(decay_steps * config.cut_frac)
  cut_frac, ratio = config.cut_frac, config.ratio
  name, nanogpt_warmup = config.schedule, config.warmup_style == 'nanogpt'

  def schedule(step):
    # One formula for both array libraries: numpy keeps the host-side value exact in float64.
    xp, dtype = (np, np.float64) if _on_host(step) else (jnp, jnp.float32)
    t = xp.asarray(step, dtype)
    if name == 'slanted_triangular':
      p = xp.where(t < cut, t / cut, 1.0 - (t - cut) / (cut * (1.0 / cut_frac - 1.0)))
      value = peak * (1.0 + xp.maximum(p, 0.0) * (ratio - 1.0)) / ratio
    else:
      if name == 'constant':
        decayed = xp.full_like(t, peak)
      elif name == 'rsqrt':
        decayed = peak * xp.sqrt(max(warmup, 1) / xp.maximum(t, max(warmup, 1)))
      else:
        progress = xp.clip((t - warmup) / (decay_steps - warmup), 0.0, 1.0)
        if name == 'cosine':
          decayed = low + 0.5 * (1.0 + xp.cos(math.pi * progress)) * (peak - low)
        else:
          decayed = low + (1.0 - progress) * (peak - low)
      if nanogpt_warmup:
        warming = peak * (t + 1.0) / (warmup + 1.0)
      else:
        warming = peak * t / max(warmup, 1)
      value = xp.where(t < warmup, warming, decayed)
    return value[()] if xp is np else value

  return schedule


def learning_rate_at(schedule: optax.Schedule, step) -> float:
  """schedule(step) as a Python float, for logging. step is the 0-based optimizer update."""
  return float(schedule(step))


# The key a scanned stack (ptm_jax.models.layers.LayerStack(scan=True)) keeps its blocks under:
# each parameter below it carries a leading (num_layers,) axis that the looped layout lacks.
_STACKED_KEY = 'layers'


def _key_name(key) -> Any:
  """A path entry's name: the dict key (DictKey) or attribute name (GetAttrKey), else None."""
  return getattr(key, 'key', getattr(key, 'name', None))


def _decay_mask(params) -> Any:
  """True for the parameters weight decay applies to: ndim >= 2 (kernels, embeddings), not
  counting the leading layer axis of each scanned stack ('layers') the parameter lies under, so
  that a stacked bias (num_layers, D) is left alone as the looped model's (D,) is."""
  def decayed(path, x):
    stacked = sum(_key_name(k) == _STACKED_KEY for k in path[:-1])
    return x.ndim - stacked >= 2
  return jax.tree_util.tree_map_with_path(decayed, params)


def _update_rule(config: ml_collections.ConfigDict, schedule) -> list:
  """The optimizer with its schedule, and coupled weight decay before it where it has no
  decoupled form: the chain's parts after clipping."""
  weight_decay = config.weight_decay
  mask = _decay_mask if config.weight_decay_mask == '' else None
  if config.name == 'adamw':
    optimizer = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                            weight_decay=weight_decay, mask=mask, nesterov=config.nesterov)
  elif config.name == 'adam':
    optimizer = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           nesterov=config.nesterov)
  elif config.name == 'sgd':
    optimizer = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
  elif config.name == 'lamb':
    optimizer = optax.lamb(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=weight_decay, mask=mask)
  else:
    # optax's adafactor adds its decay after the learning rate is applied; scaling the rate by
    # the schedule makes it decoupled decay, lr_t * weight_decay * param, as in AdamW.
    optimizer = optax.adafactor(
        schedule,
        weight_decay_rate=(lambda step: weight_decay * schedule(step)) if weight_decay else None,
        weight_decay_mask=mask)
  if weight_decay and config.name not in _DECOUPLED:
    return [optax.add_decayed_weights(weight_decay, mask=mask), optimizer]
  return [optimizer]


def _starting_at_steps(config: ml_collections.ConfigDict, schedule, start_steps
                       ) -> optax.GradientTransformation:
  """The update rule with a state of its own for each start step (gradual unfreezing).

  A group of leaves that starts at step S gets its own copy of the optimizer, which neither
  updates nor moves its state (moments, step count) before S: its first update is the
  optimizer's first, as PyTorch's per-parameter state gives it (one shared state would apply
  Adam's bias correction of step S to moments that hold one gradient, steps up to 6x too
  large). The copy's schedule is read at S + its own count, so every leaf follows the run's
  learning rate at the global step.
  """
  starts = sorted({int(s) for s in jax.tree.leaves(start_steps)})

  def group(start: int) -> optax.GradientTransformation:
    rule = optax.chain(*_update_rule(config, lambda count: schedule(count + start)))
    if start == 0:
      return rule
    return optax.transforms.conditionally_mask(rule, lambda step: step >= start)

  labels = jax.tree.map(lambda s: f'from_step_{int(s)}', start_steps)
  return optax.multi_transform({f'from_step_{s}': group(s) for s in starts}, labels)


def make_optimizer(config: ConfigLike, total_steps: int, *, params=None, start_steps=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) from `config.optimizer` for total_steps optimizer updates.

  The optimizer chains global-norm clipping (if grad_clip_norm > 0), the optimizer with its
  schedule and masked weight decay; one call of update per optimizer step.

  Args:
    config: config.optimizer (or a mapping of some of its keys).
    total_steps: the number of optimizer updates the schedule spans.
    params: optional, the unboxed parameter pytree (arrays or jax.ShapeDtypeStruct). Given, the
      optimizer's state is traced on it (nothing is allocated), so that a parameter tree the
      optimizer cannot take fails here, and a weight decay that would decay nothing is refused.
    start_steps: optional, a tree like the parameters of the step at which each leaf starts to
      train (gradual unfreezing): each start step's leaves get an optimizer state of their own
      that starts there (`_starting_at_steps`). Clipping stays over the whole gradient.

  Returns:
    The optax.GradientTransformation, and the schedule it uses (for learning_rate_at).
  """
  config = merged_config(config)
  schedule = make_schedule(config, total_steps)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if start_steps is None:
    parts.extend(_update_rule(config, schedule))
  else:
    parts.append(_starting_at_steps(config, schedule, start_steps))
  transformation = optax.chain(*parts)

  if params is not None:
    _check_params(config, transformation, params)
  return transformation, schedule


def state_shardings(transformation: optax.GradientTransformation, params, param_shardings,
                    default):
  """Shardings for `transformation`'s state on `params` (arrays or jax.ShapeDtypeStruct).

  A state leaf that mirrors a parameter (its key path ends in the parameter's path, with the
  parameter's shape: moments, momenta, unfactored second moments) takes that parameter's
  sharding; everything else (step counts, factored statistics) takes `default`. Read off the
  paths rather than by optax.tree_map_params, which cannot trace a state split by labels
  (optax.multi_transform, gradual unfreezing's per-group states).
  """
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                    jax.tree.leaves(param_shardings)):
    by_path[tuple(map(str, path))] = (tuple(leaf.shape), sharding)

  def pick(path, leaf):
    keys = tuple(map(str, path))
    for start in range(len(keys)):
      shape, sharding = by_path.get(keys[start:], (None, None))
      if shape is not None:
        return sharding if shape == tuple(leaf.shape) else default
    return default

  abstract = jax.eval_shape(transformation.init, params)
  return jax.tree_util.tree_map_with_path(pick, abstract)


def _check_params(config: ml_collections.ConfigDict,
                  transformation: optax.GradientTransformation, params) -> None:
  leaves = jax.tree.leaves(params)
  shapeless = [type(x).__name__ for x in leaves if not hasattr(x, 'ndim')]
  if shapeless:
    raise TypeError('make_optimizer(params=...) takes a pytree of arrays or '
                    f'jax.ShapeDtypeStruct; it has leaves of type {sorted(set(shapeless))}.')
  if config.weight_decay and config.weight_decay_mask == '' and not any(
      jax.tree.leaves(_decay_mask(params))):
    raise ValueError(f'config.optimizer.weight_decay is {config.weight_decay} but no parameter '
                     "has ndim >= 2 (scan's layer axis not counted), so nothing would be "
                     "decayed: set weight_decay_mask='all' "
                     'or weight_decay=0.')
  jax.eval_shape(transformation.init, params)
