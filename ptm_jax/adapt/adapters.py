"""Houlsby adapters for the transformer families, without touching the model code.

A Flax method interceptor (`nn.intercept_methods`) puts a bottleneck on the output of every
attention output projection and every FFN output projection: the nn.Dense modules at
'.../attention/out' and '.../mlp/fc_out' of the shared blocks (`ptm_jax.models.layers`, used by
GPT-2, BERT, ViT and CLIP). Its parameters live in that Dense's own scope,

  adapter_down_kernel (D, m)   adapter_down_bias (m,)
  adapter_up_kernel   (m, D)   adapter_up_bias   (D,)

so the adapted tree is the base tree plus these leaves (a scanned stack stacks them too), and the
base checkpoint loads unchanged. With y = the projection's output (B, T, D):

  y + W_up gelu(W_down y + b_down) + b_up        (exact erf GELU; m = bottleneck, 64)

The adapter sits on the projection's output, before the block's dropout, residual and LayerNorm
(Houlsby et al. 2019, figure 2). Init: W_down ~ N(0, init_std = 1e-3), biases 0, and W_up = 0.
Houlsby draw W_up from the same small normal (a near-identity adapter); it is exactly zero here,
on purpose, so that the adapted model computes exactly the base model at initialisation, bit for
bit (as LoRA's B = 0). W_up gets a gradient from the first step (gelu(W_down y)^T dL/dy is not
zero); W_down gets one as soon as W_up is not zero. The method also trains every LayerNorm and
the head (`ptm_jax.adapt.rules`).

Adapters are nonlinear: they cannot be folded into the base weights, so the adapted tree runs
inside `applied` for inference too.
"""

import contextlib
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ptm_jax.adapt import config as adapt_config_lib

# The two projections of every shared transformer block that a Houlsby adapter follows.
TARGETS = r'(^|/)(attention/out|mlp/fc_out)$'
PARAMS = ('adapter_down_kernel', 'adapter_down_bias', 'adapter_up_kernel', 'adapter_up_bias')


@dataclasses.dataclass(frozen=True)
class Adapter:
  """The `config.adapt.adapter` keys."""
  bottleneck: int = 64
  init_std: float = 1e-3

  def __post_init__(self):
    if self.bottleneck < 1:
      raise ValueError(f'config.adapt.adapter.bottleneck must be >= 1, got {self.bottleneck}.')
    # 0 would be a fixed point: with W_down = 0 (and W_up = 0) the bottleneck is gelu(0) = 0 and
    # neither kernel ever gets a gradient; only adapter_up_bias would train.
    if not self.init_std > 0:
      raise ValueError(f'config.adapt.adapter.init_std must be > 0 (W_down ~ N(0, init_std); at '
                       f'0 the adapter never trains), got {self.init_std}.')

  @classmethod
  def from_config(cls, adapt_config: ml_collections.ConfigDict) -> 'Adapter':
    c = adapt_config_lib.merged_config(adapt_config)
    return cls(bottleneck=int(c.adapter.bottleneck), init_std=float(c.adapter.init_std))


def _adapter(spec: Adapter, module: nn.Dense, y_BxTxD):
  """y + up(gelu(down(y))), with the parameters created in `module`'s scope."""
  d, m = y_BxTxD.shape[-1], spec.bottleneck
  # Logical axes as the block's own projections have them, so FSDP shards the D side alike.
  param = lambda name, init, shape, axes: module.param(
      name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)
  down = param('adapter_down_kernel', nn.initializers.normal(spec.init_std), (d, m),
               ('embed', None))
  down_bias = param('adapter_down_bias', nn.initializers.zeros, (m,), (None,))
  up = param('adapter_up_kernel', nn.initializers.zeros, (m, d), (None, 'embed'))
  up_bias = param('adapter_up_bias', nn.initializers.zeros, (d,), ('embed',))
  dtype = y_BxTxD.dtype
  h_BxTxM = jax.nn.gelu(jnp.dot(y_BxTxD, down.astype(dtype), precision=module.precision)
                        + down_bias.astype(dtype), approximate=False)
  return y_BxTxD + (jnp.dot(h_BxTxM, up.astype(dtype), precision=module.precision)
                    + up_bias.astype(dtype))


def interceptor(spec: Adapter):
  """A `nn.intercept_methods` interceptor that adds the adapters to the target projections.

  A model call (the outermost module method) that meets no target projection fails: the model
  has no transformer blocks (ResNet) and the adapters would silently train nothing.
  """
  calls = {'depth': 0, 'adapted': 0}

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == 'setup':
      return next_fun(*args, **kwargs)
    if (context.method_name == '__call__' and isinstance(module, nn.Dense)
        and re.search(TARGETS, '/'.join(module.path))):
      calls['adapted'] += 1
      return _adapter(spec, module, next_fun(*args, **kwargs))
    if calls['depth']:
      return next_fun(*args, **kwargs)
    calls['depth'], calls['adapted'] = 1, 0  # the model's outermost call
    try:
      out = next_fun(*args, **kwargs)
    finally:
      calls['depth'] = 0
    if not calls['adapted']:
      raise ValueError(
          f'config.adapt.method=adapter found no attention/out or mlp/fc_out projection in '
          f'{type(module).__name__}: Houlsby adapters go into transformer blocks (ResNet has '
          'none). Use lora, full or frozen for this model.')
    return out

  return intercept


@contextlib.contextmanager
def applied(spec: Adapter | None):
  """`with applied(spec): module.init(...) / module.apply(...)` runs the adapted model."""
  if spec is None:
    yield
    return
  with nn.intercept_methods(interceptor(spec)):
    yield
