"""One entry point for the trainer: run a model adapted by `config.adapt`, finish its parameters.

  with methods.applied(adapt_config, deterministic=...):   # around module.init / module.apply
    ...
  params = methods.prepare(params, adapt_config, rng)       # after base weights are in place

Methods that add parameters (LoRA family, adapters, prefixes, prompts) do it through Flax method
interceptors, so the model code stays the plain model and the base checkpoint loads unchanged.
"""

import contextlib

import ml_collections

from ptm_jax.adapt import adapters
from ptm_jax.adapt import config as adapt_config_lib
from ptm_jax.adapt import lora
from ptm_jax.adapt import prompts

ADDED_BY_INTERCEPTION = adapt_config_lib.LOW_RANK + ('adapter', 'prefix', 'prompt')


def _low_rank(config: ml_collections.ConfigDict) -> lora.LowRank | None:
  return lora.LowRank.from_config(config) if config.method in adapt_config_lib.LOW_RANK else None


def _adapter(config: ml_collections.ConfigDict) -> adapters.Adapter | None:
  return adapters.Adapter.from_config(config) if config.method == 'adapter' else None


def _prefix_or_prompt(config: ml_collections.ConfigDict):
  if config.method == 'prefix':
    return prompts.Prefix.from_config(config)
  return prompts.Prompt.from_config(config) if config.method == 'prompt' else None


@contextlib.contextmanager
def applied(adapt_config, *, deterministic: bool = True):
  """Runs module.init / module.apply inside as the adapted model (a no-op for full/frozen).

  The interceptors act while a function is traced: jit a function first called inside the
  context (jax.jit reuses a trace made outside it, whatever the context is now).
  """
  config = adapt_config_lib.merged_config(adapt_config)
  with (lora.applied(_low_rank(config), deterministic=deterministic),
        adapters.applied(_adapter(config)), prompts.applied(_prefix_or_prompt(config))):
    yield


def model_dtype(adapt_config, dtype: str) -> str:
  """The compute dtype config.model.dtype should have under this method: QLoRA computes in its
  compute_dtype (bf16) throughout, its dequantised kernels and the rest of the model alike."""
  if adapt_config.method == 'qlora':
    return adapt_config.qlora.compute_dtype
  return dtype


def adds_parameters(adapt_config) -> bool:
  config = adapt_config_lib.merged_config(adapt_config)
  return config.method in ADDED_BY_INTERCEPTION


def prepare(params, adapt_config, rng=None):
  """Finishes adapted parameters after the base weights were loaded (DoRA norms, QLoRA NF4,
  prompts drawn from the loaded vocabulary with `rng`, a jax.random key)."""
  config = adapt_config_lib.merged_config(adapt_config)
  spec = _low_rank(config)
  if spec is not None:
    return lora.prepare(params, spec)
  prompt = _prefix_or_prompt(config)
  if isinstance(prompt, prompts.Prompt) and prompt.init == 'vocab':
    if rng is None:
      raise ValueError("config.adapt.prompt.init='vocab' draws vocabulary rows: pass "
                       'rng=jax.random.key(...) to methods.prepare.')
    return prompts.init_prompts_from_vocabulary(params, prompt, rng)
  return params


def merge(params, adapt_config):
  """The plain model's parameters (every added branch folded in or dropped).

  Adapters, prefixes and prompts add computation that no base weight can hold: their trees stay
  as they are (prefix: per-layer prefixes with the MLP dropped) and keep running in `applied`.
  """
  config = adapt_config_lib.merged_config(adapt_config)
  if config.method == 'prefix':
    return prompts.drop_reparameterisation(params)
  spec = _low_rank(config)
  return lora.merge(params, spec) if spec is not None else params
