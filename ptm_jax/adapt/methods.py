"""One entry point for the trainer: run a model adapted by `config.adapt`, finish its parameters.

  with methods.applied(adapt_config, deterministic=...):   # around module.init / module.apply
    ...
  params = methods.prepare(params, adapt_config)            # after base weights are in place

Methods that add parameters (LoRA family, adapters, prefixes, prompts) do it through Flax method
interceptors, so the model code stays the plain model and the base checkpoint loads unchanged.
"""

import contextlib

import ml_collections

from ptm_jax.adapt import config as adapt_config_lib
from ptm_jax.adapt import lora


def _low_rank(config: ml_collections.ConfigDict) -> lora.LowRank | None:
  return lora.LowRank.from_config(config) if config.method in adapt_config_lib.LOW_RANK else None


@contextlib.contextmanager
def applied(adapt_config, *, deterministic: bool = True):
  """Runs module.init / module.apply inside as the adapted model (a no-op for full/frozen)."""
  config = adapt_config_lib.merged_config(adapt_config)
  with lora.applied(_low_rank(config), deterministic=deterministic):
    yield


def adds_parameters(adapt_config) -> bool:
  config = adapt_config_lib.merged_config(adapt_config)
  return config.method in adapt_config_lib.LOW_RANK


def prepare(params, adapt_config):
  """Finishes adapted parameters after the base weights were loaded (DoRA norms, QLoRA NF4)."""
  config = adapt_config_lib.merged_config(adapt_config)
  spec = _low_rank(config)
  return lora.prepare(params, spec) if spec is not None else params


def merge(params, adapt_config):
  """The plain model's parameters (every added branch folded in or dropped)."""
  config = adapt_config_lib.merged_config(adapt_config)
  spec = _low_rank(config)
  return lora.merge(params, spec) if spec is not None else params
