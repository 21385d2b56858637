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

import json
import math
import os
import sys
import time
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
from ptm_jax.data import pipeline
from ptm_jax.models import registry
from ptm_jax.train import checkpointing, objectives, optimizers
from ptm_jax.train.config import RESUMABLE_KEYS, finalize

# ------------------------------------------------------------------------------------------------
# Model and train state.


def _model_and_variables(config, family: str, info, mesh, example_inputs: dict, rng):
  """(module, variables sharded on the mesh, variable shardings)."""
  task = config.data.task
  if config.init.from_pretrained:
    overrides = registry.data_fields(family, task, info, config.data)
    overrides.pop('vocab_size', None)  # a pretrained vocabulary is the checkpoint's own
    module, variables = ptm_jax.from_pretrained(
        config.init.from_pretrained, registry.DTYPES[config.model.dtype],
        head=registry.head_for(family, task), config_overrides=overrides, rng=rng, mesh=mesh)
    abstract = partitioning.abstract_variables(module, example_inputs)
    return module, variables, partitioning.variable_shardings(abstract, mesh)
  module, _ = registry.build_model(config.model, task, info, config.data)
  abstract = partitioning.abstract_variables(module, example_inputs)
  shardings = partitioning.variable_shardings(abstract, mesh)
  init = jax.jit(lambda r: nn.unbox(module.init(r, **example_inputs)), out_shardings=shardings)
  return module, init(rng), shardings


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------------
# Steps.


def make_steps(module, family: str, config, tx):
  """(train_step, eval_step) as plain functions of (state, batch); jitted by the caller."""
  objective_name = registry.TASK_OBJECTIVES[config.data.task]
  objective = objectives.OBJECTIVES[objective_name]
  options = {}
  if objective_name == 'classification':
    options['label_smoothing'] = float(config.loss.label_smoothing)

  def forward(params, extra, batch, train: bool, rng):
    variables = {'params': params, **extra}
    inputs = registry.model_inputs(family, batch)
    if family == 'resnet':
      if train:
        out, updates = module.apply(variables, **inputs, train=True, mutable=['batch_stats'])
        return out, updates
      return module.apply(variables, **inputs), extra
    out = module.apply(variables, **inputs, deterministic=not train,
                       rngs={'dropout': rng} if train else None)
    return out, extra

  def loss_fn(params, extra, batch, train, rng):
    out, new_extra = forward(params, extra, batch, train, rng)
    kwargs = dict(options)
    if objective_name == 'contrastive':
      kwargs['logit_scale'] = params['logit_scale']
    loss, metrics = objective(out, batch, **kwargs)
    return loss, (metrics, new_extra)

  def train_step(state, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (metrics, extra)), grads = grad_fn(state['params'], state['extra'], batch, True, rng)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    new_state = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state,
                     extra=extra)
    return new_state, metrics

  def eval_step(state, batch):
    _, (metrics, _) = loss_fn(state['params'], state['extra'], batch, False, None)
    return metrics

  return train_step, eval_step, objective_name


# ------------------------------------------------------------------------------------------------
# Metrics.


class MetricWriter:
  """metrics.jsonl (one JSON object per log or eval) + TensorBoard events + the terminal."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool):
    self.enabled = enabled
    self.total_steps = total_steps
    self._tb = None
    if enabled:
      import tensorboardX  # Imported here: only the writing process needs it.
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
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


def _items_per_step(config, task: str) -> tuple[int, str]:
  if task in ('causal_lm', 'mlm_nsp', 'text_classification'):
    return config.batch_size * config.data.seq_len, 'tokens_per_sec'
  if task in ('image_classification', 'image_text'):
    return config.batch_size, 'images_per_sec'
  return config.batch_size, 'examples_per_sec'


def evaluate(eval_step, state, loader, objective_name: str, max_steps: int) -> dict:
  loader.reset()
  results = []
  for i, batch in enumerate(loader):
    if max_steps and i >= max_steps:
      break
    results.append(_scalars(eval_step(state, batch)))
  return objectives.merge_metrics(results, objectives.MERGE_WEIGHTS[objective_name])


# ------------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, dry_run: bool = False,
                       overwrite: bool = False) -> dict:
  """Trains (resuming from workdir's checkpoints), evaluates, and returns summary.json's dict."""
  config = finalize(config)
  config.data = pipeline.merged_config(config.data)
  if config.optimizer.grad_accum_steps != 1:
    # optax.MultiSteps counts micro-batches; the loop, logging and checkpoints count updates.
    # Until the loop runs grad_accum_steps micro-batches per step, refuse rather than mis-train.
    raise ValueError('optimizer.grad_accum_steps > 1 is not supported by experiments/train.py '
                     'yet; raise batch_size (and the mesh) instead.')
  is_writer = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  # Refuses a workdir of a different config (unless overwrite) and writes DIR/config.json.
  checkpointing.check_workdir(workdir, config_json, overwrite=overwrite,
                              allowed_to_differ=RESUMABLE_KEYS)

  mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  task = config.data.task
  tokenizer = pipeline.make_tokenizer(config.data, checkpoint=config.init.from_pretrained)
  # The family: the preset's, or the checkpoint's own (its config.json is read once, here).
  family = (registry.family_of(config.model.name) if not config.init.from_pretrained
            else ptm_jax.hub.pretrained.read_config(ptm_jax.hub.pretrained.resolve(
                config.init.from_pretrained))['model_type'])
  train_loader = pipeline.make_loader(config, config.data.train_split, train=True, mesh=mesh,
                                      tokenizer=tokenizer, family=family)
  info = train_loader.info
  if tokenizer is not None and hasattr(tokenizer, 'save') and is_writer:
    tokenizer.save(os.path.join(workdir, 'tokenizer.json'))

  first_batch = next(train_loader)  # shapes for init and compilation; then back to the start
  train_loader.reset()
  rng = jax.random.key(config.seed)
  init_rng, model_rng, step_rng = jax.random.split(rng, 3)
  example_inputs = registry.model_inputs(family, first_batch)
  module, variables, var_shardings = _model_and_variables(
      config, family, info, mesh, example_inputs, init_rng)
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)

  params = variables['params']
  extra = {k: v for k, v in variables.items() if k != 'params'}
  replicated = NamedSharding(mesh, P())
  # Optimizer state shaped like a parameter takes its sharding; factored or scalar state
  # (adafactor's row/column statistics, counts) is replicated.
  opt_shardings = optax.tree_map_params(
      tx, lambda leaf, p, s: s if leaf.shape == p.shape else replicated,
      jax.eval_shape(tx.init, params), params, var_shardings['params'],
      transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': opt_state,
           'extra': extra, 'rng': jax.random.key_data(step_rng)}
  state_shardings = {'step': replicated, 'params': var_shardings['params'],
                     'opt_state': opt_shardings,
                     'extra': {k: v for k, v in var_shardings.items() if k != 'params'},
                     'rng': replicated}
  state = jax.device_put(state, state_shardings)

  train_fn, eval_fn, objective_name = make_steps(module, family, config, tx)

  def train_step(state, batch):
    state = dict(state, rng=jax.random.wrap_key_data(state['rng']))
    new_state, metrics = train_fn(state, batch)
    metrics['learning_rate'] = schedule(state['step'])
    return dict(new_state, rng=jax.random.key_data(new_state['rng'])), metrics

  def eval_step(state, batch):
    return eval_fn(dict(state, rng=None), batch)

  batch_sharding = pipeline.batch_sharding(mesh)
  jit_train = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
  jit_eval = jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding),
                     out_shardings=replicated)

  total_params = count_params(params)
  t0 = time.time()
  compiled = jit_train.lower(state, first_batch).compile()
  compile_s = time.time() - t0
  memory = compiled.memory_analysis()
  step_bytes = None
  if memory is not None:
    step_bytes = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                     + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  summary = {'total_params': total_params, 'trainable_params': total_params,
             'train_step_memory_bytes': step_bytes, 'compile_seconds': compile_s,
             'mesh': dict(mesh.shape), 'devices': jax.device_count(),
             'device_kind': jax.devices()[0].device_kind, 'batch_size': config.batch_size,
             'model': config.init.from_pretrained or config.model.name, 'task': task}
  if is_writer:
    print(f'Model {summary["model"]} ({family}): {total_params:,} parameters, all trainable. '
          f'Train step compiled in {compile_s:.1f} s; step memory {step_bytes} bytes.', flush=True)
  if dry_run:
    summary['dry_run'] = True
    _write_summary(workdir, summary, is_writer)
    return summary

  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                            keep=config.keep_checkpoints,
                                            save_every=config.checkpoint_every)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = checkpointer.restore(abstract)
  if restored is not None:
    step, state, data_state = restored
    train_loader.set_state(data_state)
    logging.info('Resumed from step %d.', step)
  start = int(state['step'])
  eval_loader = pipeline.make_loader(config, config.data.eval_split, train=False, mesh=mesh,
                                     tokenizer=tokenizer, family=family)
  writer = MetricWriter(workdir, config.total_steps, is_writer)
  items, unit = _items_per_step(config, task)
  checkpointer.install_sigterm_handler()
  last_eval: dict = {}
  train_metrics: dict = {}
  timer_step, timer_t = start, time.time()
  steps_timed, seconds_timed = 0, 0.0
  try:
    for step in range(start + 1, config.total_steps + 1):
      batch = next(train_loader)
      state, metrics = jit_train(state, batch)
      done = step == config.total_steps
      if step % config.log_every == 0 or done:
        train_metrics = _scalars(metrics)
        if not math.isfinite(train_metrics['loss']):
          raise FloatingPointError(
              f'Loss is {train_metrics["loss"]} at step {step}; stopping. The last good '
              f'checkpoint (step {checkpointer.latest_step()}) is kept in {workdir}. Lower '
              'the learning rate or enable gradient clipping (optimizer.grad_clip_norm).')
        elapsed = time.time() - timer_t
        rate = (step - timer_step) / max(elapsed, 1e-9)
        if step - timer_step > 1 or not steps_timed:
          steps_timed += step - timer_step
          seconds_timed += elapsed
        record = {'step': step, 'split': 'train', **train_metrics,
                  'steps_per_sec': rate, unit: rate * items,
                  'eta_seconds': (config.total_steps - step) / max(rate, 1e-9)}
        writer.write(record)
        timer_step, timer_t = step, time.time()
      if (config.eval_every and step % config.eval_every == 0) or done:
        last_eval = evaluate(jit_eval, state, eval_loader, objective_name, config.eval_steps)
        writer.write({'step': step, 'split': 'eval', **last_eval})
        timer_t = time.time()
      if checkpointer.preempted or done or (config.checkpoint_every
                                            and step % config.checkpoint_every == 0):
        checkpointer.save(step, state, train_loader.get_state(), force=True)
      if checkpointer.preempted:
        checkpointer.wait()
        logging.warning('Preempted (SIGTERM) at step %d: checkpoint saved, exiting.', step)
        sys.exit(143)
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.close()

  summary.update({'final_step': config.total_steps, 'train': train_metrics, 'eval': last_eval,
                  'seconds_per_step': seconds_timed / max(steps_timed, 1)})
  _write_summary(workdir, summary, is_writer)
  return summary


def _write_summary(workdir: str, summary: dict, is_writer: bool):
  if is_writer:
    with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/NAME.py[:ARGS]).',
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, summary.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Compile the train step, write summary.json '
                             '(memory, parameter counts) and exit without training.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a run of a different config in '
                               '--workdir instead of refusing.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, dry_run=_DRY_RUN.value,
                               overwrite=_OVERWRITE.value)
  print(json.dumps({k: summary[k] for k in ('eval', 'train', 'total_params') if k in summary}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
