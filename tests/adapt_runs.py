"""Tiny trainer runs of configs/digits.py for the adaptation tests, and their checkpoints."""

import importlib.util
import os

import numpy as np
import orbax.checkpoint as ocp

from experiments import train
from ptm_jax.adapt import rules
from ptm_jax.train import checkpointing

_DIGITS = os.path.join(os.path.dirname(__file__), '..', 'configs', 'digits.py')


def digits_config():
  """configs/digits.py in its runlocal form."""
  spec = importlib.util.spec_from_file_location('digits', _DIGITS)
  digits = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(digits)
  return digits.get_config('runlocal')


def digits_run(workdir: str, steps: int, *, weight_decay: float, **adapt):
  """A 2-layer, 32-wide ViT on digits for `steps` constant-rate steps, checkpointed every step,
  with config.adapt updated from `adapt` (its 'data' entry updates config.data).
  -> (summary, checkpoint directory)."""
  config = digits_config()
  config.total_steps = steps
  config.log_every = config.checkpoint_every = 1
  config.keep_checkpoints = steps
  config.eval_steps = 1
  config.batch_size = 16
  config.mesh.devices = 1   # compiles faster; the sharded step is tested elsewhere
  config.model.num_layers = 2
  config.model.hidden_size = 32
  config.model.intermediate_size = 64
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = 'constant'
  config.optimizer.weight_decay = weight_decay
  config.data.update(adapt.pop('data', {}))
  config.adapt.update(adapt)
  summary = train.train_and_evaluate(config, str(workdir))
  return summary, os.path.join(str(workdir), 'checkpoints')


def trained_params(checkpoint_dir: str, step: int) -> dict:
  """{'/'-joined path: array} of the train state's parameters in checkpoint `step`."""
  step_dir = os.path.join(checkpoint_dir, str(step), checkpointing.STATE_ITEM)
  with ocp.StandardCheckpointer() as reader:
    state = reader.restore(step_dir)
  return {k: np.asarray(v) for k, v in rules.flatten(state['params']).items()}
