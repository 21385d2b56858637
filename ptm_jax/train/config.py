"""The trainer's configuration: every top-level key with its default, and config-file arguments.

Config files (configs/NAME.py) start from `base_config()` and set what their experiment needs;
`--config.KEY=VALUE` on the command line can then change any key, and unknown keys are errors.
"""

from typing import Any

import ml_collections

from ptm_jax.adapt import config as adapt_config
from ptm_jax.data import pipeline
from ptm_jax.train import optimizers
from ptm_jax.train import runtime


# Config keys that may change between a run and its resumption (the rest must match). 'mesh':
# the checkpoint restores onto any mesh.
RESUMABLE_KEYS = ('total_steps', 'log_every', 'eval_every', 'checkpoint_every', 'eval_steps',
                  'keep_checkpoints', 'profile', 'eval_batch_size', 'runtime', 'mesh')

# Counts of base_config() for which 0 means something else; negative values are errors.
_ZERO_MEANS = {'log_every': 'log only the last step', 'eval_every': 'evaluate only at the end',
               'eval_steps': 'the whole eval split', 'eval_batch_size': 'batch_size',
               'checkpoint_every': 'only at the end and on preemption'}


def base_config() -> ml_collections.ConfigDict:
  """Every top-level key the trainer reads, with its default. Configs start from this."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 32                 # global, over all hosts and devices
  c.log_every = 50                  # 0: log only the last step
  c.eval_every = 500                # 0: evaluate only at the end
  c.eval_steps = 0                  # 0: the whole eval split
  c.eval_batch_size = 0             # global; 0: batch_size
  c.checkpoint_every = 500          # 0: only at the end and on preemption
  c.keep_checkpoints = 3            # the latest N; None: all
  # A jax.profiler trace of train steps start_step+1 .. start_step+num_steps, written to
  # DIR/profile (TensorBoard's profile tab or xprof; python -m experiments.profile_summary
  # --profile_dir=DIR/profile prints where the step's time went). num_steps 0: no trace.
  # python_tracer: also record the host's Python calls (where the input pipeline's time goes);
  # False gives a smaller trace of the same op times.
  c.profile = ml_collections.ConfigDict({'start_step': 10, 'num_steps': 0,
                                         'python_tracer': True})
  # -1: the devices left over. devices: use the first N devices (0 = all), e.g. 1 for a
  # single-device reference run on a multi-device machine.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1, 'devices': 0})
  # dtype: the compute dtype ('bfloat16' = mixed precision: bf16 matmuls and activations,
  # float32 parameters, optimizer state and losses). remat: a ptm_jax.models.layers
  # REMAT_POLICIES name; scan_layers: one lax.scan over the blocks (parameters stacked).
  # vocab_size: 0 = the tokenizer's; larger pads it (text families).
  c.model = ml_collections.ConfigDict({'name': 'vit-ti/16', 'dtype': 'float32',
                                       'remat': 'none', 'scan_layers': False, 'vocab_size': 0})
  c.init = ml_collections.ConfigDict({'from_pretrained': ''})
  c.data = pipeline.default_config()
  c.optimizer = optimizers.default_config()
  c.loss = ml_collections.ConfigDict({'label_smoothing': 0.0})
  c.adapt = adapt_config.default_config()   # which parameters train, and how (ptm_jax.adapt)
  c.runtime = runtime.default_config()      # CPU device count, XLA flags (ptm_jax.train.runtime)
  return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` over base_config(): unknown keys anywhere are an error that names them."""
  out = base_config()

  def merge(base, new, prefix):
    for key, value in new.items():
      if key not in base:
        # Family config fields (checked by the registry) and the source task's config.data keys
        # (checked by the data pipeline).
        if prefix in ('model.', 'adapt.source.'):
          base[key] = value
          continue
        raise ValueError(f'Unknown config key {prefix}{key}; known keys under '
                         f'{prefix or "the top level"}: {sorted(base.keys())}.')
      if isinstance(value, ml_collections.ConfigDict) and isinstance(base[key],
                                                                     ml_collections.ConfigDict):
        merge(base[key], value, f'{prefix}{key}.')
      else:
        base[key] = value
  merge(out, config, '')
  for key, zero in _ZERO_MEANS.items():
    if out[key] < 0:
      raise ValueError(f'config.{key}={out[key]} is negative; set it to a positive count or 0 '
                       f'({zero}).')
  # A run resumes from its latest checkpoint, so it keeps at least that one. (Refused here, not
  # by the Checkpointer after the data and the compilation.)
  if out.keep_checkpoints is not None and out.keep_checkpoints < 1:
    raise ValueError(f'config.keep_checkpoints={out.keep_checkpoints} must be at least 1 (or None: '
                     'keep them all): a run keeps its latest checkpoint to resume from, and with 2 '
                     'or more one to fall back to if the latest is damaged.')
  return out


def parse_arg(arg: str, **defaults: Any) -> ml_collections.ConfigDict:
  """A config file's argument string 'k1=v1,k2=v2' -> ConfigDict over `defaults`.

  Values take the type of their default (bool accepts true/false/1/0/yes/no); keys without a
  default are an error that lists the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (a.strip() for a in arg.split(','))):
    key, sep, value = item.partition('=')
    if not sep:
      value = 'True'  # a bare 'runlocal' means runlocal=True
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; known: {sorted(defaults)}.')
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
        raise ValueError(f'Config argument {key}={value!r} is not a boolean.')
      out[key] = value.lower() in ('true', '1', 'yes')
    else:
      out[key] = kind(value)
  return out
