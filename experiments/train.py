r"""The trainer: pre-trains or fine-tunes any ptm_jax model on any task, from a config file.

  python -m experiments.train --config=configs/NAME.py[:ARGS] --workdir=DIR \
      [--config.KEY=VALUE ...] [--dry_run] [--overwrite]

The flow is one way:
  config -> mesh; data (ptm_jax.data) -> model (ptm_jax.models.registry or from_pretrained)
  -> sharded train state -> jitted train step (ptm_jax.train.objectives, .optimizers)
  -> metrics.jsonl / TensorBoard / checkpoints (ptm_jax.train.checkpointing) -> summary.json.

The run resumes by itself from the latest good checkpoint in DIR (train state and data-iterator
position together), so kill it at any time and start the same command again.
"""

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Callable, NamedTuple
from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import ptm_jax
from ptm_jax import partitioning
from ptm_jax.adapt import config as adapt_config_lib
from ptm_jax.adapt import ewc
from ptm_jax.adapt import methods as adapt_methods
from ptm_jax.adapt import peft_export
from ptm_jax.adapt import rules as adapt_rules
from ptm_jax.data import pipeline
from ptm_jax.models import layers, registry
from ptm_jax.train import (checkpointing, distributed, hardware, objectives, optimizers,
                           profiling, runtime)
from ptm_jax.train.config import RESUMABLE_KEYS, base_config, finalize

# The key under which gradient accumulation sums the loss the step reports (EWC's term included).
TOTAL_LOSS = '_total_loss'
# Where --dry_run writes its summary in a workdir whose summary.json is a trained run's.
DRY_RUN_SUMMARY_FILE = 'dry_run_summary.json'

# ------------------------------------------------------------------------------------------------
# Model and train state.


def _model_and_variables(config, family: str, info, mesh, example_inputs: dict, rng):
  """(module, variables sharded on the mesh, variable shardings)."""
  task = config.data.task
  if config.init.from_pretrained:
    overrides = registry.data_fields(family, task, info, config.data)
    overrides.pop('vocab_size', None)  # a pretrained vocabulary is the checkpoint's own
    module, variables = ptm_jax.from_pretrained(
        config.init.from_pretrained, registry.dtype_of(config.model),
        head=registry.head_for(family, task), config_overrides=overrides, rng=rng, mesh=mesh)
    stack = registry.layer_stack_of(config.model, family)
    if stack != layers.LayerStack():
      module = module.clone(layer_stack=stack)
    abstract = partitioning.abstract_variables(module, example_inputs)
    shardings = partitioning.variable_shardings(abstract, mesh)
    if stack.scan:  # the checkpoint's layer_0 ... layer_{n-1} become one stacked 'layers'
      variables = jax.jit(layers.stack_layers, out_shardings=shardings)(variables)
    return module, variables, shardings
  module, _ = registry.build_model(config.model, task, info, config.data)
  abstract = partitioning.abstract_variables(module, example_inputs)
  shardings = partitioning.variable_shardings(abstract, mesh)
  if family != 'resnet' and module.layer_stack.scan:
    # Initialise as the looped stack does, then stack: scan on or off trains the same weights.
    looped = module.clone(layer_stack=dataclasses.replace(module.layer_stack, scan=False))
    init_fn = lambda r: layers.stack_layers(nn.unbox(looped.init(r, **example_inputs)))
  else:
    init_fn = lambda r: nn.unbox(module.init(r, **example_inputs))
  return module, jax.jit(init_fn, out_shardings=shardings)(rng), shardings


def _adapted(module, variables, shardings, adapt, example_inputs, rng, mesh):
  """(variables, shardings) with the adaptation's parameters added (LoRA, ...), base kept."""
  if not adapt_methods.adds_parameters(adapt):
    return variables, shardings
  with adapt_methods.applied(adapt):
    abstract = partitioning.abstract_variables(module, example_inputs)
    adapted_shardings = partitioning.variable_shardings(abstract, mesh)
    fresh = jax.jit(lambda r: nn.unbox(module.init(r, **example_inputs)),
                    out_shardings=adapted_shardings)(rng)
  # The base weights (loaded or initialised as the plain model) replace the fresh ones; only the
  # added leaves keep their initialisation.
  params = adapt_rules.unflatten({**adapt_rules.flatten(fresh['params']),
                                  **adapt_rules.flatten(variables['params'])})
  params = jax.jit(lambda p: adapt_methods.prepare(p, adapt, jax.random.fold_in(rng, 1)))(params)
  known = adapt_rules.flatten(adapted_shardings['params'])
  replicated = NamedSharding(mesh, P())
  param_shardings = adapt_rules.unflatten(
      {k: known.get(k, replicated) for k in adapt_rules.flatten(params)})  # QLoRA's NF4 leaves
  params = jax.device_put(params, param_shardings)
  return dict(variables, params=params), dict(shardings, params=param_shardings)


def _adapted_optimizer(optimizer_config, rates: dict, trainable, adapt, total_steps: int):
  """(tx, schedule): config.optimizer's optimizer with the per-leaf multipliers and, for gradual
  unfreezing, the start steps (each group's optimizer state starts at its own)."""
  trainable_flat = adapt_rules.flatten(trainable)
  rate_tree = adapt_rules.unflatten({p: rates[p] for p in trainable_flat})
  start_steps = None
  if adapt.method == 'gradual_unfreeze':
    if any(p.startswith('layers/') or '/layers/' in p for p in trainable_flat):
      raise ValueError('gradual_unfreeze needs the blocks as layer_0 ... layer_N; set '
                       'config.model.scan_layers=False.')
    depths = adapt_rules.layer_depths(trainable_flat)
    groups = max(depths.values()) + 1
    every = adapt.gradual.unfreeze_every or max(1, total_steps // (groups + 1))
    start_steps = adapt_rules.unfreeze_steps(trainable, depths, every)
    rate_tree = adapt_rules.unflatten(
        {p: rates[p] * adapt.gradual.factor ** -depths[p] for p in trainable_flat})
  tx, schedule = optimizers.make_optimizer(optimizer_config, total_steps,
                                           start_steps=start_steps)
  if start_steps is None and all(r == 1.0 for r in jax.tree.leaves(rate_tree)):
    return tx, schedule
  before, after = adapt_rules.rate_transform(rate_tree, start_steps)
  return optax.chain(before, tx, after), schedule


class RehearsalLoader:
  """Each global batch: `source_rows` rows of the source task, then the target task's rows.

  Both loaders are resumable; their states are saved together. Rows are joined on the devices
  and laid out with the batch sharding again (the source rows are the first data shards').
  """

  def __init__(self, target, source, batch_sharding):
    self.target, self.source, self.info = target, source, target.info
    self._join = jax.jit(lambda s, t: jax.tree.map(lambda a, b: jnp.concatenate([a, b]), s, t),
                         out_shardings=batch_sharding)

  def __next__(self):
    source, target = next(self.source), next(self.target)
    common = sorted(set(source) & set(target))
    return self._join({k: source[k] for k in common}, {k: target[k] for k in common})

  def __iter__(self):
    return self

  def reset(self):
    self.target.reset()
    self.source.reset()

  def get_state(self):
    return {'target': self.target.get_state(), 'rehearsal': self.source.get_state()}

  def set_state(self, state):
    self.target.set_state(state['target'])
    self.source.set_state(state['rehearsal'])


def source_task_config(config, adapt) -> ml_collections.ConfigDict | None:
  """The run's config with config.data replaced by the source task's (config.adapt.source)."""
  if not adapt.source:
    return None
  source = ml_collections.ConfigDict(config.to_dict())
  source.data.update(dict(adapt.source))
  source.data = pipeline.merged_config(source.data)
  return source


def rehearsal_rows(adapt, batch_size: int, data_parallel: int) -> int:
  """Source rows per batch: fraction x batch_size, a multiple of the data-parallel size."""
  if not adapt.rehearsal.fraction:
    return 0
  rows = int(round(adapt.rehearsal.fraction * batch_size / data_parallel)) * data_parallel
  if not 0 < rows < batch_size:
    raise ValueError(f'config.adapt.rehearsal.fraction={adapt.rehearsal.fraction} gives {rows} '
                     f'source rows of a batch of {batch_size} split over {data_parallel} data '
                     'shards: choose a fraction that leaves both tasks at least one row per shard.')
  return rows


def _eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config with batch_size = config.eval_batch_size (when set), for evaluation loaders."""
  if not config.get('eval_batch_size'):
    return config
  out = ml_collections.ConfigDict(config.to_dict())
  out.batch_size = config.eval_batch_size
  return out


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_bytes_per_device(tree) -> int:
  """The most bytes of `tree` that any one device holds (shows FSDP/tensor sharding)."""
  per_device: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return int(max(per_device.values()))


# ------------------------------------------------------------------------------------------------
# Steps.


def _forward_flops(module, family: str, config, tx, jit_eval, state, constants, batch):
  """XLA's FLOP count of the eval step's forward pass over one global batch, or None.

  XLA's cost analysis counts a loop's body once, not once per trip, so a scanned stack is
  counted on its looped twin (the same maths) with the parameters' shapes unstacked.
  """
  if family == 'resnet' or not module.layer_stack.scan:
    return hardware.flops_of(jit_eval.lower(state, constants, batch))
  looped = make_steps(module.clone(layer_stack=dataclasses.replace(module.layer_stack,
                                                                   scan=False)),
                      family, config, tx)
  unstacked = jax.eval_shape(lambda *trees: [layers.unstack_layers(t) for t in trees],
                             state, constants)
  return hardware.flops_of(jax.jit(lambda s, c, b: looped.eval(dict(s, rng=None), c, b)).lower(
      *unstacked, batch))


class Steps(NamedTuple):
  train: Callable      # (state, constants, batch) -> (state, metrics)
  eval: Callable       # (state, constants, batch) -> metrics
  objective: str
  loss: Callable       # (trainable, constants, extra, batch, train, rng) -> (loss, (metrics, extra))


def make_steps(module, family: str, config, tx) -> Steps:
  """The train and eval steps as plain functions of (state, constants, batch); jitted by the
  caller.

  state['params'] holds the trainable parameters only. constants: {'frozen': the other
  parameters (config.adapt; no gradient, no optimizer state), 'ewc': {'anchor', 'fisher'} when
  EWC is on}; missing keys mean nothing frozen, no EWC.
  """
  objective_name = registry.TASK_OBJECTIVES[config.data.task]
  objective = objectives.OBJECTIVES[objective_name]
  adapt = adapt_config_lib.merged_config(config.adapt)
  # Feature extraction keeps a frozen ResNet's BatchNorm statistics as the checkpoint's.
  batch_stats_train = not (adapt.freeze_batch_stats
                           and adapt.method not in ('full', 'gradual_unfreeze'))
  options = {}
  if objective_name == 'classification':
    options['label_smoothing'] = float(config.loss.label_smoothing)

  def forward(params, extra, batch, train: bool, rng):
    variables = {'params': params, **extra}
    inputs = registry.model_inputs(family, batch)
    with adapt_methods.applied(adapt, deterministic=not train):
      if family == 'resnet':
        if train and batch_stats_train:
          out, updates = module.apply(variables, **inputs, train=True, mutable=['batch_stats'],
                                      rngs={'dropout': rng})
          return out, updates
        # Frozen statistics: the inference form of BatchNorm, but LoRA's dropout still draws.
        return module.apply(variables, **inputs, rngs={'dropout': rng} if train else None), extra
      out = module.apply(variables, **inputs, deterministic=not train,
                         rngs={'dropout': rng} if train else None)
    return out, extra

  def objective_terms(trainable, constants, extra, batch, train, rng, reduction='mean'):
    """(the objective's loss, EWC's term or 0, metrics, extra) of one batch."""
    params = adapt_rules.combine(trainable, constants.get('frozen', {}))
    out, new_extra = forward(params, extra, batch, train, rng)
    kwargs = dict(options)
    if objective_name == 'contrastive':
      kwargs['logit_scale'] = params['logit_scale']
    if reduction != 'mean':
      kwargs['reduction'] = reduction
    loss, metrics = objective(out, batch, **kwargs)
    ewc_term = 0.0
    if train and 'ewc' in constants:
      # EWC: weight / 2 * sum F (theta - theta*)^2 keeps what mattered for the source task.
      ewc_penalty = ewc.penalty(trainable, constants['ewc']['anchor'], constants['ewc']['fisher'])
      metrics = dict(metrics, ewc_penalty=ewc_penalty)
      ewc_term = 0.5 * adapt.ewc.weight * ewc_penalty
    return loss, ewc_term, metrics, new_extra

  def loss_fn(trainable, constants, extra, batch, train, rng):
    loss, ewc_term, metrics, extra = objective_terms(trainable, constants, extra, batch, train, rng)
    return loss + ewc_term, (metrics, extra)

  # The gradient is taken of a sum where the objective has one (objectives.SUM_REDUCIBLE) and
  # divided by the batch's count of examples or tokens afterwards: the same gradient as the
  # mean's, but the count's all-reduce over the data axes no longer holds up the backward pass.
  # weight: that count (1 for the objectives differentiated as a mean).
  count_key = objectives.SUM_REDUCIBLE.get(objective_name)

  def grad_target(trainable, constants, extra, batch, rng):
    """(target, (loss, metrics, extra, weight)): grad(target) / weight is grad(loss)."""
    if count_key is None:
      loss, (metrics, extra) = loss_fn(trainable, constants, extra, batch, True, rng)
      return loss, (loss, metrics, extra, jnp.float32(1.0))
    loss_sum, ewc_term, metrics, extra = objective_terms(trainable, constants, extra, batch,
                                                         True, rng, reduction='sum')
    weight = metrics[count_key].astype(jnp.float32)
    # With no scored label (weight 0) the whole gradient is 0, EWC's included: no data, no step.
    return loss_sum + weight * ewc_term, (metrics['loss'] + ewc_term, metrics, extra, weight)

  grad_fn = jax.value_and_grad(grad_target, has_aux=True)
  accum_steps = int(config.optimizer.grad_accum_steps)
  if accum_steps > 1 and objective_name == 'contrastive':
    raise ValueError('optimizer.grad_accum_steps > 1 would shrink the contrastive loss\'s '
                     'negatives to one micro-batch; use a larger batch over more devices instead.')

  def normalised(grads_sum, weight_sum):
    if count_key is None and accum_steps == 1:
      return grads_sum  # weight 1
    return jax.tree.map(lambda g: g / jnp.where(weight_sum > 0, weight_sum, 1.0), grads_sum)

  def accumulated_grads(params, constants, extra, batch, rng):
    """loss, metrics, extra and gradients of the batch, in accum_steps micro-batches.

    Micro-batches are weighted by their counts of examples or tokens, so that the accumulated
    gradient is the full batch's (the mean over all its tokens, padding excluded). MLM + NSP
    averages two losses with different counts; its micro-batches are weighted equally (as
    BERT's own code does).
    """
    if accum_steps == 1:
      (_, (loss, metrics, extra, weight)), grads = grad_fn(params, constants, extra, batch, rng)
      return loss, metrics, extra, normalised(grads, weight)

    def split(x):  # (B, ...) -> (k, B/k, ...); micro-batch i takes rows i, i+k, ... so each
      # device's rows stay on that device.
      return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)

    def body(carry, i_and_micro):
      i, micro = i_and_micro
      grads_sum, weight_sum, metrics_sum, extra = carry
      (_, (loss, metrics, extra, w)), grads = grad_fn(params, constants, extra, micro,
                                                      jax.random.fold_in(rng, i))
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      # Counts (num_*) add up; every other metric is a weighted mean. The objective's own loss
      # stays under 'loss' (the perplexities derive from it); the loss with EWC's term, which
      # the step reports, under TOTAL_LOSS.
      metrics_sum = {k: metrics_sum[k] + (v if k.startswith('num_') else w * v)
                     for k, v in dict(metrics, **{TOTAL_LOSS: loss}).items()}
      return (grads_sum, weight_sum + w, metrics_sum, extra), None

    micro_batches = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    metric_shapes = jax.eval_shape(lambda: grad_fn(params, constants, extra, first, rng)[0][1][1])
    metric_zeros = {k: jnp.zeros(m.shape, jnp.float32) for k, m in metric_shapes.items()}
    metric_zeros[TOTAL_LOSS] = jnp.float32(0.0)
    (grads_sum, weight_sum, metrics_sum, extra), _ = jax.lax.scan(
        body, (jax.tree.map(jnp.zeros_like, params), jnp.float32(0.0), metric_zeros, extra),
        (jnp.arange(accum_steps), micro_batches))
    grads = normalised(grads_sum, weight_sum)
    # A batch with no scored label (weight 0) reports 0, as one big batch does, not 0 / 0.
    safe_weight = jnp.where(weight_sum > 0, weight_sum, 1.0)
    metrics = {k: v if k.startswith('num_') else v / safe_weight for k, v in metrics_sum.items()}
    loss = metrics.pop(TOTAL_LOSS)
    # Perplexity is exp of the accumulated mean loss, as one big batch gives, not a mean of exps.
    metrics = objectives.derive_metrics(metrics, jnp)
    return loss, metrics, extra, grads

  def train_step(state, constants, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    loss, metrics, extra, grads = accumulated_grads(state['params'], constants, state['extra'],
                                                    batch, rng)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    new_state = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state,
                     extra=extra)
    return new_state, metrics

  def eval_step(state, constants, batch):
    _, (metrics, _) = loss_fn(state['params'], constants, state['extra'], batch, False, None)
    return metrics

  return Steps(train_step, eval_step, objective_name, loss_fn)


# ------------------------------------------------------------------------------------------------
# Metrics.


def _import_tensorboardx():
  """tensorboardX, imported here (only the writing process needs it) without torch.

  tensorboardX imports torch when it can, only to accept torch tensors, which this trainer never
  passes; that import cost 1-2 s of every run's start-up. Unless torch is already loaded, it is
  hidden for the duration of the import and then made importable again.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None  # `import torch` raises ImportError while this is set
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


def _keep_records_until(path: str, step: int):
  """Rewrites metrics.jsonl with the records of steps <= step only (atomically). A last line that
  a kill cut short goes too: the next record would otherwise continue it into one bad line."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    if not line.endswith('\n'):
      break
    try:
      record_step = json.loads(line).get('step', 0)
    except (json.JSONDecodeError, AttributeError):
      record_step = 0  # not this trainer's line: kept as it is
    if not isinstance(record_step, int) or record_step <= step:
      kept.append(line)
  if kept != lines:
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.writelines(kept)
    os.replace(path + '.tmp', path)


class MetricWriter:
  """metrics.jsonl (one JSON object per log or eval) + TensorBoard events + the terminal.

  A run resumed from step `start_step` > 0 redoes the steps after it that the killed run had
  logged: their records leave metrics.jsonl, and TensorBoard is told to drop them (purge_step),
  so both show each step once.
  """

  def __init__(self, workdir: str, total_steps: int, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self.total_steps = total_steps
    self._tb = None
    if enabled:
      tensorboardX = _import_tensorboardx()
      path = os.path.join(workdir, 'metrics.jsonl')
      if start_step:
        _keep_records_until(path, start_step)
      self._jsonl = open(path, 'a', encoding='utf-8')
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'),
                                            purge_step=start_step + 1 if start_step else None)
    self._bar = None
    if enabled and sys.stderr.isatty():
      import tqdm
      self._bar = tqdm.tqdm(total=total_steps, unit='step', dynamic_ncols=True)

  def write(self, record: dict):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for key, value in record.items():
      if key not in ('step', 'split') and isinstance(value, (int, float)):
        self._tb.add_scalar(f'{record["split"]}/{key}', value, record['step'])
    self._tb.flush()
    text = ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                    for k, v in record.items())
    if self._bar is not None:
      self._bar.set_postfix_str(text[:120])
      self._bar.n = record['step']
      self._bar.refresh()
    else:
      print(text, flush=True)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self._bar is not None:
        self._bar.close()


def _scalars(metrics: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _items_per_step(config, task: str) -> dict[str, int]:
  """The throughput units of a train log record -> items a step. Causal LM windows are all real
  text; the other text tasks pad each example to seq_len, so their tokens are positions computed
  (padded_tokens_per_sec), and examples are what they process."""
  if task == 'causal_lm':
    return {'tokens_per_sec': config.batch_size * config.data.seq_len}
  if task in ('mlm_nsp', 'text_classification'):
    return {'examples_per_sec': config.batch_size,
            'padded_tokens_per_sec': config.batch_size * config.data.seq_len}
  if task in ('image_classification', 'image_text'):
    return {'images_per_sec': config.batch_size}
  return {'examples_per_sec': config.batch_size}


def evaluate(eval_step, state, loader, objective_name: str, max_steps: int) -> dict:
  loader.reset()
  results = []
  for i, batch in enumerate(loader):
    if max_steps and i >= max_steps:
      break
    # Fetched before the next batch: many independent multi-device CPU programs in flight at
    # once can hang XLA's collectives (jax-ml/jax#25861; PERFORMANCE.md, 2026-12-03).
    results.append(_scalars(eval_step(state, batch)))
  if not results:
    raise ValueError(f'The eval split {loader.info.split!r} gave no batch of the global '
                     'batch_size: give it more data, or set config.data.eval_split to a larger '
                     'split.')
  return objectives.merge_metrics(results, objectives.MERGE_WEIGHTS[objective_name])


# ------------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, dry_run: bool = False,
                       overwrite: bool = False) -> dict:
  """Trains (resuming from workdir's checkpoints), evaluates, and returns summary.json's dict."""
  config = finalize(config)
  runtime.configure(config.runtime)  # first: CPU device count and XLA flags need a fresh JAX
  config.data = pipeline.merged_config(config.data)
  adapt = adapt_config_lib.merged_config(config.adapt)
  config.model.dtype = adapt_methods.model_dtype(adapt, config.model.dtype)
  is_writer = jax.process_index() == 0
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  # Refuses a workdir of a different config (unless overwrite) or a file, creates it and writes
  # DIR/config.json.
  checkpointing.check_workdir(workdir, config_json, overwrite=overwrite,
                              allowed_to_differ=RESUMABLE_KEYS)
  os.makedirs(workdir, exist_ok=True)

  devices = jax.devices()
  if config.mesh.devices:
    if config.mesh.devices > len(devices) or jax.process_count() > 1:
      raise ValueError(f'config.mesh.devices={config.mesh.devices} but this single-process run '
                       f'has {len(devices)} devices: set it to at most {len(devices)}, or 0 '
                       '(all devices; required with several processes).')
    devices = devices[:config.mesh.devices]
  mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                devices=devices)
  task = config.data.task
  tokenizer = pipeline.make_tokenizer(config.data, checkpoint=config.init.from_pretrained)
  # The family: the preset's, or the checkpoint's own (its config.json is read once, here).
  family = (registry.family_of(config.model.name) if not config.init.from_pretrained
            else ptm_jax.hub.pretrained.model_type_of(ptm_jax.hub.pretrained.resolve(
                config.init.from_pretrained)))
  source_config = source_task_config(config, adapt)
  data_parallel = pipeline.data_parallel_size(mesh)
  source_rows = rehearsal_rows(adapt, config.batch_size, data_parallel)
  target_config = config
  if source_rows:
    target_config = ml_collections.ConfigDict(config.to_dict())
    target_config.batch_size = config.batch_size - source_rows
  train_loader = pipeline.make_loader(target_config, config.data.train_split, train=True,
                                      mesh=mesh, tokenizer=tokenizer, family=family)
  if source_rows:  # rehearsal: every batch mixes in source-task rows
    source_loader_config = ml_collections.ConfigDict(source_config.to_dict())
    source_loader_config.batch_size = source_rows
    train_loader = RehearsalLoader(
        train_loader, pipeline.make_loader(source_loader_config, source_config.data.train_split,
                                           train=True, mesh=mesh, tokenizer=tokenizer,
                                           family=family),
        pipeline.batch_sharding(mesh))
  info = train_loader.info
  if tokenizer is not None and hasattr(tokenizer, 'save') and is_writer:
    tokenizer.save(os.path.join(workdir, 'tokenizer.json'))

  accum = optimizers.merged_config(config.optimizer).grad_accum_steps  # checked >= 1 there
  if config.batch_size % (accum * data_parallel):
    raise ValueError(f'batch_size {config.batch_size} does not split into '
                     f'optimizer.grad_accum_steps={accum} micro-batches that the data-parallel '
                     f'size {data_parallel} divides: make batch_size a multiple of '
                     f'{accum * data_parallel}.')
  first_batch = next(train_loader)  # shapes for init and compilation; then back to the start
  train_loader.reset()
  rng = jax.random.key(config.seed)
  init_rng, _, step_rng = jax.random.split(rng, 3)  # the middle key is unused (kept: same runs)
  example_inputs = registry.model_inputs(family, first_batch)
  module, variables, var_shardings = _model_and_variables(
      config, family, info, mesh, example_inputs, init_rng)
  variables, var_shardings = _adapted(module, variables, var_shardings, adapt, example_inputs,
                                      jax.random.fold_in(init_rng, 1), mesh)
  # Which parameters train (config.adapt): the step differentiates and optimises only those.
  rates = adapt_rules.treatments(variables['params'], adapt, family)
  params, frozen = adapt_rules.split(variables['params'], rates)
  param_shardings, frozen_shardings = adapt_rules.split(var_shardings['params'], rates)
  tx, schedule = _adapted_optimizer(config.optimizer, rates, params, adapt, config.total_steps)

  extra = {k: v for k, v in variables.items() if k != 'params'}
  replicated = NamedSharding(mesh, P())
  # Optimizer state shaped like a parameter takes its sharding; factored or scalar state
  # (adafactor's row/column statistics, counts) is replicated.
  opt_shardings = optimizers.state_shardings(tx, params, param_shardings, replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': opt_state,
           'extra': extra, 'rng': jax.random.key_data(step_rng)}
  state_shardings = {'step': replicated, 'params': param_shardings,
                     'opt_state': opt_shardings,
                     'extra': {k: v for k, v in var_shardings.items() if k != 'params'},
                     'rng': replicated}
  state = jax.device_put(state, state_shardings)

  steps = make_steps(module, family, config, tx)
  objective_name = steps.objective

  def train_step(state, constants, batch):
    state = dict(state, rng=jax.random.wrap_key_data(state['rng']))
    new_state, metrics = steps.train(state, constants, batch)
    metrics['learning_rate'] = schedule(state['step'])
    return dict(new_state, rng=jax.random.key_data(new_state['rng'])), metrics

  def eval_step(state, constants, batch):
    return steps.eval(dict(state, rng=None), constants, batch)

  batch_sharding = pipeline.batch_sharding(mesh)
  # The frozen parameters (and EWC's anchor and Fisher) are an argument: not donated, not in
  # the checkpoint (they come back from the checkpoint or seed they were built from), never a
  # compiled-in constant.
  constants = {'frozen': frozen}
  constant_shardings = {'frozen': frozen_shardings}
  if adapt.ewc.weight > 0:
    # Fisher at the starting point (the source task's optimum), from source training examples.
    fisher_loader = pipeline.make_loader(source_config, source_config.data.train_split,
                                         train=True, mesh=mesh, tokenizer=tokenizer,
                                         family=family)
    fisher = ewc.fisher_diagonal(
        lambda p, b: steps.loss(p, constants, extra, b, False, None)[0], params,
        [next(fisher_loader) for _ in range(adapt.ewc.fisher_batches)])
    # A copy: the state's own buffers are donated to the train step.
    constants['ewc'] = {'anchor': jax.tree.map(lambda x: x.copy(), params), 'fisher': fisher}
    constant_shardings['ewc'] = {'anchor': param_shardings, 'fisher': param_shardings}
    constants = jax.device_put(constants, constant_shardings)
  jit_train = jax.jit(train_step, in_shardings=(state_shardings, constant_shardings,
                                                batch_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
  jit_eval = jax.jit(eval_step, in_shardings=(state_shardings, constant_shardings,
                                              batch_sharding),
                     out_shardings=replicated)
  eval_step_fn = lambda state, batch: jit_eval(state, constants, batch)

  trainable_report = adapt_rules.report(rates, variables['params'])
  total_params = trainable_report['total_params']
  t0 = time.time()
  with runtime.single_core_compilation(config.runtime.single_core_kernels):
    compiled = jit_train.lower(state, constants, first_batch).compile()
  compile_s = time.time() - t0
  train_step_fn = lambda state, batch: compiled(state, constants, batch)
  # MFU's numerator (ptm_jax.train.hardware): 3 x the forward FLOPs of one global batch.
  forward_flops = _forward_flops(module, family, config, tx, jit_eval, state, constants,
                                 first_batch)
  model_flops = 3 * forward_flops if forward_flops else None
  memory = compiled.memory_analysis()
  step_bytes = None
  if memory is not None:
    step_bytes = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                     + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  summary = {**trainable_report, 'adapt_method': adapt.method,
             'train_step_memory_bytes': step_bytes, 'compile_seconds': compile_s,
             'model_flops_per_step': model_flops,
             'compute_dtype': config.model.dtype,
             'param_dtypes': sorted({str(x.dtype) for x in
                                     jax.tree.leaves(variables['params'])}),
             'param_bytes_per_device': param_bytes_per_device(variables['params']),
             'mesh': dict(mesh.shape), 'devices': mesh.size,
             'device_kind': jax.devices()[0].device_kind, 'batch_size': config.batch_size,
             'model': config.init.from_pretrained or config.model.name, 'task': task}
  if is_writer:
    trainable = trainable_report['trainable_params']
    print(f'Model {summary["model"]} ({family}), adapt.method={adapt.method}: {total_params:,} '
          f'parameters, {trainable:,} trainable '
          f'({trainable_report["trainable_percent"]:.2f}%). Train step compiled in {compile_s:.1f} s; step memory {step_bytes} bytes.', flush=True)
  if dry_run:
    summary['dry_run'] = True
    if _read_summary(workdir) is not None:
      # A trained run's results stay in summary.json; the dry run's go beside them.
      _write_summary(workdir, summary, is_writer, DRY_RUN_SUMMARY_FILE)
      if is_writer:
        print(f'{workdir}/summary.json holds a trained run\'s results; this dry run\'s summary '
              f'is in {DRY_RUN_SUMMARY_FILE}.', flush=True)
    else:
      _write_summary(workdir, summary, is_writer)
    return summary

  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                            keep=config.keep_checkpoints,
                                            save_every=config.checkpoint_every)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  source_before = None
  if source_config is not None:
    # Forgetting: the source task's eval metrics at the starting point (recomputed on resume,
    # before the restore replaces the starting state) and after training.
    source_eval_loader = pipeline.make_loader(_eval_config(source_config),
                                              source_config.data.eval_split,
                                              train=False, mesh=mesh, tokenizer=tokenizer,
                                              family=family)
    source_before = evaluate(eval_step_fn, state, source_eval_loader, objective_name,
                             config.eval_steps)
  restored = checkpointer.restore(abstract)
  if restored is not None:
    step, state, data_state = restored
    train_loader.set_state(data_state)
    logging.info('Resumed from step %d.', step)
  start = int(state['step'])
  if start >= config.total_steps:
    finished = _read_summary(workdir)
    # The summary of this very state, not one of an earlier total_steps that the run went past
    # before a preemption.
    keep = finished is not None and finished.get('final_step') == start
    if jax.process_count() > 1:  # one decision for all: the other branch has collectives
      from jax.experimental import multihost_utils
      keep = bool(multihost_utils.broadcast_one_to_all(np.int32(keep)))
    if keep:
      # A finished run started again (the same command line after the job ended): its results
      # stand; training nothing and overwriting them with empty metrics would lose them.
      checkpointer.close()
      if is_writer:
        print(f'The run in {workdir} already reached step {start} of total_steps='
              f'{config.total_steps}; its summary.json is kept. Raise --config.total_steps to '
              'train on (with optimizer.decay_steps=0 the schedule stretches to the new total).',
              flush=True)
      return finished or {}  # {} on a process that cannot read process 0's summary.json
  eval_loader = pipeline.make_loader(_eval_config(config), config.data.eval_split, train=False,
                                     mesh=mesh,
                                     tokenizer=tokenizer, family=family)
  writer = MetricWriter(workdir, config.total_steps, is_writer, start_step=start)
  throughput_units = _items_per_step(config, task)
  checkpointer.install_sigterm_handler()
  last_eval: dict = {}
  train_metrics: dict = {}
  timer_step, timer_t = start, time.time()
  steps_timed, seconds_timed = 0, 0.0
  first_interval = (0, 0.0)
  tracing = False  # a trace is running (config.profile; a resumed run may start past it)
  try:
    for step in range(start + 1, config.total_steps + 1):
      if config.profile.num_steps and step == config.profile.start_step + 1:
        jax.block_until_ready(state)  # the trace holds the profiled steps only
        # The step's compiled text beside the trace names its ops (experiments.profile_summary).
        if is_writer:
          profiling.write_hlo(compiled, os.path.join(workdir, 'profile'), 'train_step')
        jax.profiler.start_trace(os.path.join(workdir, 'profile'),
                                 profiler_options=profiling.profiler_options(
                                     config.profile.python_tracer))
        tracing = True
      batch = next(train_loader)
      state, metrics = train_step_fn(state, batch)
      done = step == config.total_steps
      if tracing and (step == config.profile.start_step + config.profile.num_steps or done):
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False
      if (config.log_every and step % config.log_every == 0) or done:
        train_metrics = _scalars(metrics)
        if not math.isfinite(train_metrics['loss']):
          raise _not_finite(f'Loss is {train_metrics["loss"]} at step {step}', checkpointer,
                            workdir)
        elapsed = time.time() - timer_t
        rate = (step - timer_step) / max(elapsed, 1e-9)
        # seconds_per_step leaves out the first interval (the first steps' warm-up) unless it is
        # the only one.
        if timer_step == start:
          first_interval = (step - timer_step, elapsed)
        else:
          steps_timed += step - timer_step
          seconds_timed += elapsed
        record = {'step': step, 'split': 'train', **train_metrics,
                  'steps_per_sec': rate,
                  **{unit: rate * items for unit, items in throughput_units.items()},
                  'eta_seconds': (config.total_steps - step) / max(rate, 1e-9)}
        utilisation = hardware.mfu(model_flops, 1 / max(rate, 1e-9), mesh.size)
        if utilisation is not None:
          record['mfu'] = utilisation
        writer.write(record)
        timer_step, timer_t = step, time.time()
      # SIGTERM (one process) or JAX's preemption service (all processes agree on the step).
      preempted = checkpointer.reached_preemption(step)
      if preempted or done or (config.checkpoint_every and step % config.checkpoint_every == 0):
        # Between log steps nothing has been looked at: a NaN state must not become the latest
        # checkpoint, which a NaN stop promises to keep good. The loss is that of the state
        # before this step's update, so the updated parameters are checked too.
        loss = _scalars({'loss': metrics['loss']})['loss']
        if not math.isfinite(loss):
          raise _not_finite(f'Loss is {loss} at step {step}', checkpointer, workdir)
        if not bool(_all_finite(state['params'])):
          raise _not_finite(f'The parameters are not finite after step {step}', checkpointer,
                            workdir)
        # Saved before this step's eval (the save is asynchronous), so an eval that fails (out
        # of memory, say) loses no training.
        checkpointer.save(step, state, train_loader.get_state(), force=True)
      if (config.eval_every and step % config.eval_every == 0) or done:
        last_eval = evaluate(eval_step_fn, state, eval_loader, objective_name,
                             config.eval_steps)
        writer.write({'step': step, 'split': 'eval', **last_eval})
        # The next log interval starts after the eval, in steps as in time.
        timer_step, timer_t = step, time.time()
      if preempted:
        checkpointer.wait()
        logging.warning('Preempted (SIGTERM) at step %d: checkpoint saved, exiting.', step)
        sys.exit(143)
  finally:
    if tracing:  # the loop stopped inside the traced steps (NaN loss, preemption)
      jax.profiler.stop_trace()
    checkpointer.wait()
    checkpointer.close()
    writer.close()

  if not steps_timed:
    steps_timed, seconds_timed = first_interval
  seconds_per_step = seconds_timed / max(steps_timed, 1)
  if not last_eval:  # no step ran: the restored run had reached total_steps already
    last_eval = evaluate(eval_step_fn, state, eval_loader, objective_name, config.eval_steps)
  summary.update({'final_step': max(start, config.total_steps), 'train': train_metrics,
                  'eval': last_eval,
                  'seconds_per_step': seconds_per_step,
                  'mfu': hardware.mfu(model_flops, seconds_per_step, mesh.size)})
  if source_before is not None:
    source_after = evaluate(eval_step_fn, state, source_eval_loader, objective_name,
                            config.eval_steps)
    summary['forgetting'] = {'source_before': source_before, 'source_after': source_after}
    if 'accuracy' in source_before:
      summary['forgetting']['accuracy_drop'] = (source_before['accuracy']
                                                - source_after['accuracy'])
  if adapt.method in adapt_config_lib.LOW_RANK:
    summary['exports'] = _export_low_rank(
        module, adapt_rules.combine(state['params'], frozen), state['extra'], adapt, workdir,
        config.init.from_pretrained or None, is_writer)
  _write_summary(workdir, summary, is_writer)
  return summary


def _export_low_rank(module, params, extra, adapt, workdir: str, base: str | None,
                     is_writer: bool) -> dict:
  """WORKDIR/adapter (peft's LoRA layout) and WORKDIR/merged (transformers) of a LoRA run.

  Returns {'adapter': path or why not, 'merged': path or why not} for summary.json.
  """
  reason = peft_export.unsupported(module)
  if reason:
    if is_writer:
      logging.warning('No adapter/ or merged/ export: %s', reason)
    return {'adapter': reason, 'merged': reason}
  if jax.process_count() > 1:  # a collective: every process takes part, process 0 writes
    from jax.experimental import multihost_utils
    params, extra = multihost_utils.process_allgather((params, extra), tiled=True)
  exports = {}
  if is_writer:
    for name, save in (('adapter', lambda out: peft_export.save_adapter(
        module, params, adapt, out, base_model_name_or_path=base)),
                       ('merged', lambda out: peft_export.save_merged(
                           module, params, adapt, out, other_variables=extra))):
      try:
        exports[name] = save(os.path.join(workdir, name))
      except ValueError as e:  # the run's checkpoints stand; say what the export lacks
        logging.warning('No %s/ export: %s', name, e)
        exports[name] = str(e)
  return exports


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every value in the pytree is finite: a scalar bool."""
  return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.isfinite(x).all(), tree),
                         jnp.array(True))


def _not_finite(what: str, checkpointer, workdir: str) -> FloatingPointError:
  """The NaN/Inf stop: `what` happened, nothing more is saved, the last good checkpoint stays."""
  latest = checkpointer.latest_step()
  kept = (f'The last good checkpoint (step {latest}) is kept in {workdir}.' if latest is not None
          else f'No checkpoint had been saved yet in {workdir}.')
  return FloatingPointError(
      f'{what}; stopping. {kept} Lower the learning rate or enable gradient clipping '
      '(optimizer.grad_clip_norm).')


def _read_summary(workdir: str) -> dict | None:
  """WORKDIR/summary.json of a trained run, or None where there is none (or it is a dry run's,
  or damaged)."""
  try:
    with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if isinstance(summary, dict) and not summary.get('dry_run') else None


def _write_summary(workdir: str, summary: dict, is_writer: bool, name: str = 'summary.json'):
  if is_writer:
    with open(os.path.join(workdir, name), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/NAME.py[:ARGS]).',
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, summary.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Compile the train step, write summary.json '
                             '(memory, parameter counts) and exit without training.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a run of a different config in '
                               '--workdir instead of refusing.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Multi-host: call '
                                 'jax.distributed.initialize() with cluster auto-detection '
                                 '(TPU pods, SLURM).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'Multi-process without a cluster '
                                   'manager: host:port of process 0 (with --num_processes and '
                                   '--process_id).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index, from 0.')


def _unknown_override(argv: list[str], error: str) -> str | None:
  """The message for ml_collections' KeyError `error` ("'KEY'[\nDid you mean ...]") about a
  --config.PATH of argv that the config lacks, or None when no override names KEY."""
  name = re.match(r"'([^']*)'", error)
  paths = [a.lstrip('-')[len('config.'):].partition('=')[0] for a in argv[1:]
           if re.match(r'--?config\.', a)]
  path = next((p for p in paths if name and name[1] in p.split('.')), None)
  if path is None:
    return None
  parts = path.split('.')
  key = '.'.join(parts[:parts.index(name[1]) + 1])
  parent = key.rpartition('.')[0]
  node = base_config()
  for part in filter(None, parent.split('.')):
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  hint = error.partition('\n')[2]
  message = f'--config.{path}: unknown config key {key}' + (f' ({hint})' if hint else '')
  if isinstance(node, ml_collections.ConfigDict):
    message += f'; known keys under {parent or "the top level"}: {sorted(node.keys())}'
    if parent == 'model':
      message += ' and the model family\'s fields that the config file sets'
  return message + '.'


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with the config flag's raw errors reported as flag errors that name the
  key or the file: ml_collections raises a bare KeyError deep in its parser for a --config.KEY
  that the config lacks, and defers a config file's failure to load to its first read."""
  try:
    args = app.parse_flags_with_usage(argv)
    _CONFIG.value.keys()  # a config file that failed to load raises its OSError here
    return args
  except OSError as e:
    cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    message = (f'--config: the config file could not be loaded ({cause}). Give an existing '
               'configs/NAME.py[:ARGS], relative to the current directory '
               f'({os.getcwd()}) or absolute.')
  except (AttributeError, KeyError) as e:
    error = e
    while isinstance(error, BaseException) and error.args:  # AttributeError(KeyError("'KEY'"))
      error = error.args[0]
    message = _unknown_override(argv, str(error))
    if message is None:
      raise
  sys.stderr.write(f'FATAL Flags parsing error: {message}\n'
                   'Pass --helpshort or --helpfull to see help on flags.\n')
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         auto=_DISTRIBUTED.value)
  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, dry_run=_DRY_RUN.value,
                               overwrite=_OVERWRITE.value)
  print(json.dumps({k: summary[k] for k in ('eval', 'train', 'total_params') if k in summary}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=_parse_flags)
