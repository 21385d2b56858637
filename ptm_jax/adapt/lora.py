"""LoRA, DoRA and QLoRA for any ptm_jax model, without touching the model code.

The low-rank branch is added by a Flax method interceptor (`nn.intercept_methods`): every
nn.Dense, nn.Conv or nn.Embed whose module path ('/'-joined, e.g. 'bert/layer_3/attention/query')
matches `LowRank.targets` gets, in its own scope, the parameters

  lora_a          (in, r) Dense | (kh, kw, in, r) Conv | (num_embeddings, r) Embed
  lora_b          (r, out)
  dora_magnitude  (out,)  DoRA only
  nf4_*           QLoRA only: the frozen kernel stored as NF4 (`ptm_jax.adapt.nf4`), in place of
                  'kernel'

so the adapted model's parameters are the base tree plus these leaves, under the same paths (a
scanned stack stacks them too), and the base checkpoint loads unchanged.

  LoRA   y = W0 x + b + s * B A dropout(x),  s = alpha / r (rsLoRA: alpha / sqrt(r)).
         x @ A @ B is computed as two thin matmuls; the (in, out) delta is never formed.
         A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's kaiming_uniform(a=sqrt(5)), as PEFT),
         B = 0, so the adapted model starts exactly at the base model. Embeddings: A = 0,
         B ~ N(0, 1) (PEFT's choice for embeddings).
  DoRA   y = (m / ||W0 + s A B||_c) * (W0 x + s B A dropout(x)) + b with the column norm (one
         per output feature: over axis 0 of an (in, out) kernel) treated as a constant in the
         backward pass (the DoRA paper's section 4.3); m starts at ||W0||_c. With dropout in
         training, PEFT rescales W0 dropout(x) by (m / ||.||_c - 1) on top of the undropped
         W0 x; here the undropped base output is rescaled, as the formula above (REFERENCE.md)
         writes it. The two agree without dropout and at evaluation.
  QLoRA  LoRA over a frozen NF4 kernel, dequantised on the fly to compute_dtype (bf16).

`prepare` finishes an adapted tree after base weights were loaded into it (DoRA's magnitude from
the loaded kernel, QLoRA's quantisation); `merge` folds the branch into plain kernels (a model
that runs without the interceptor and saves as a transformers checkpoint); `unmerge` undoes a
LoRA merge.
"""

import contextlib
import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ptm_jax.adapt import config as adapt_config_lib
from ptm_jax.adapt import nf4
from ptm_jax.adapt import rules
from ptm_jax.models import layers

NF4_PREFIX = 'nf4_'
_DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class LowRank:
  """What to adapt and how: the `config.adapt.lora` (and `.qlora`) keys, plus the method."""
  method: str = 'lora'             # 'lora', 'dora' or 'qlora'
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dropout: float = 0.0
  targets: str = adapt_config_lib.DEFAULT_LORA_TARGETS
  block_size: int = 64             # QLoRA's NF4 blocks
  double_quant: bool = True
  compute_dtype: str = 'bfloat16'  # QLoRA's dequantised kernels and matmuls

  def __post_init__(self):
    if self.method not in adapt_config_lib.LOW_RANK:
      raise ValueError(f'LowRank.method must be one of {adapt_config_lib.LOW_RANK}, got '
                       f'{self.method!r}.')
    if self.rank < 1:
      raise ValueError(f'LoRA rank must be >= 1, got {self.rank}.')
    if self.compute_dtype not in _DTYPES:
      raise ValueError(f'config.adapt.qlora.compute_dtype must be one of {sorted(_DTYPES)}, got '
                       f'{self.compute_dtype!r}.')
    re.compile(self.targets)

  @property
  def scale(self) -> float:
    """s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  @classmethod
  def from_config(cls, adapt_config: ml_collections.ConfigDict) -> 'LowRank':
    c = adapt_config_lib.merged_config(adapt_config)
    return cls(method=c.method, rank=int(c.lora.rank), alpha=float(c.lora.alpha),
               rslora=bool(c.lora.rslora), dropout=float(c.lora.dropout),
               targets=c.lora.targets, block_size=int(c.qlora.block_size),
               double_quant=bool(c.qlora.double_quant), compute_dtype=c.qlora.compute_dtype)

  def matches(self, module_path: str) -> bool:
    return re.search(self.targets, module_path) is not None


# PyTorch's nn.Linear / Conv default init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
# (jax's kaiming_uniform is sqrt(6) = 2.45x wider.)
_torch_linear_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def module_path(module: nn.Module) -> str:
  """'/'-joined path of a bound module ('bert/layer_0/attention/query'); a root module's name."""
  return '/'.join(module.path) or (module.name or '')


def _dropout(module: nn.Module, x, rate: float, deterministic: bool):
  if deterministic or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _compute_dtype(module: nn.Module, x):
  return module.dtype or x.dtype


def _quantised(module: nn.Module) -> dict | None:
  if not module.has_variable('params', NF4_PREFIX + 'codes'):
    return None
  return {k[len(NF4_PREFIX):]: v for k, v in module.variables['params'].items()
          if k.startswith(NF4_PREFIX)}


def _dense(spec: LowRank, module: nn.Dense, x, deterministic: bool, next_fun):
  in_features, out_features = x.shape[-1], module.features
  out_dtype = _compute_dtype(module, x)  # what the plain Dense returns
  quantised = _quantised(module)
  if quantised is None and not module.has_variable('params', 'kernel'):
    next_fun(x)  # initialisation: let the Dense create its kernel and bias
  a = module.param('lora_a', _torch_linear_init, (in_features, spec.rank), module.param_dtype)
  b = module.param('lora_b', nn.initializers.zeros, (spec.rank, out_features), module.param_dtype)
  if quantised is not None:
    dtype = _DTYPES[spec.compute_dtype]
    kernel = nf4.dequantize(quantised, (in_features, out_features), dtype,
                            block_size=spec.block_size)
  else:
    dtype = _compute_dtype(module, x)
    kernel = nn.unbox(module.get_variable('params', 'kernel'))  # boxed during init
  bias = nn.unbox(module.get_variable('params', 'bias')) if module.use_bias else None
  x = x.astype(dtype)
  base = jnp.dot(x, kernel.astype(dtype), precision=module.precision)
  low_rank = jnp.dot(jnp.dot(_dropout(module, x, spec.dropout, deterministic), a.astype(dtype),
                             precision=module.precision),
                     b.astype(dtype), precision=module.precision) * jnp.asarray(spec.scale, dtype)
  if spec.method == 'dora':
    w0 = kernel.astype(jnp.float32)
    magnitude = module.param('dora_magnitude', lambda _: jnp.linalg.norm(w0, axis=0),
                             ).astype(jnp.float32)
    adapted = w0 + spec.scale * jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                                        precision=jax.lax.Precision.HIGHEST)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(adapted, axis=0))
    y = (magnitude / norm).astype(dtype) * (base + low_rank)
  else:
    y = base + low_rank
  if bias is not None:
    y = y + bias.astype(dtype)
  return y.astype(out_dtype)


def _conv(spec: LowRank, module: nn.Conv, x, deterministic: bool, next_fun):
  if spec.method != 'lora':
    raise ValueError(f'{spec.method} adapts Dense layers only; '
                     f'{module_path(module)} is a convolution: narrow lora.targets.')
  y = next_fun(x)
  kernel_size = tuple(module.kernel_size)
  in_features = x.shape[-1]
  a = module.param('lora_a', _torch_linear_init, (*kernel_size, in_features, spec.rank),
                   module.param_dtype)
  b = module.param('lora_b', nn.initializers.zeros, (spec.rank, module.features),
                   module.param_dtype)
  dtype = _compute_dtype(module, x)
  strides = module.strides or (1,) * len(kernel_size)
  strides = (strides,) * len(kernel_size) if isinstance(strides, int) else tuple(strides)
  padding = nn.linear.canonicalize_padding(module.padding, len(kernel_size))
  h = layers.conv_general_dilated(  # a 1x1 kernel's as a dot, as the base convolution's
      _dropout(module, x, spec.dropout, deterministic).astype(dtype), a.astype(dtype),
      window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=module.precision)
  return y + jnp.dot(h, b.astype(dtype), precision=module.precision) * spec.scale


def _embed(spec: LowRank, module: nn.Embed, ids, next_fun):
  if spec.method != 'lora':
    raise ValueError(f'{spec.method} adapts Dense layers only; '
                     f'{module_path(module)} is an embedding: narrow lora.targets.')
  y = next_fun(ids)
  # nn.Embed declares its table in setup(), so Module.param refuses new parameters outside it;
  # its scope creates them all the same, in the same place.
  a = module.scope.param('lora_a', nn.initializers.zeros, (module.num_embeddings, spec.rank),
                         module.param_dtype)
  b = module.scope.param('lora_b', nn.initializers.normal(1.0), (spec.rank, module.features),
                         module.param_dtype)
  return y + (jnp.take(a, ids, axis=0) @ b).astype(y.dtype) * spec.scale


def interceptor(spec: LowRank, *, deterministic: bool = True):
  """A `nn.intercept_methods` interceptor that adds the low-rank branch to the target layers."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != '__call__'
        or not isinstance(module, (nn.Dense, nn.Conv, nn.Embed))
        or not spec.matches(module_path(module))):
      return next_fun(*args, **kwargs)
    if kwargs:
      raise ValueError(f'Unexpected keyword arguments {sorted(kwargs)} to {module.path}.')
    if isinstance(module, nn.Dense):
      return _dense(spec, module, args[0], deterministic, next_fun)
    if isinstance(module, nn.Conv):
      return _conv(spec, module, args[0], deterministic, next_fun)
    return _embed(spec, module, args[0], next_fun)

  return intercept


@contextlib.contextmanager
def applied(spec: LowRank | None, *, deterministic: bool = True):
  """`with applied(spec): module.init(...) / module.apply(...)` runs the adapted model."""
  if spec is None:
    yield
    return
  with nn.intercept_methods(interceptor(spec, deterministic=deterministic)):
    yield


# ------------------------------------------------------------------------------------------------
# Whole-tree operations on (unboxed) parameter trees.


def _modules(flat: dict) -> list[str]:
  """Module paths that carry a low-rank branch."""
  return sorted(p[:-len('/lora_a')] for p in flat if p.endswith('/lora_a'))


def _stacked(path: str) -> bool:
  """Parameters under a scanned stack have a leading (num_layers,) axis."""
  return '/layers/' in f'/{path}/'


def _delta(spec: LowRank, a, b):
  """s * A @ B in the base weight's layout ((in, out), (kh, kw, in, out) or (num, out))."""
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  pattern = '...hwir,...ro->...hwio' if a.ndim == b.ndim + 2 else '...ir,...ro->...io'
  return spec.scale * jnp.einsum(pattern, a32, b32, precision=jax.lax.Precision.HIGHEST)


def _base_name(flat: dict, module: str) -> str:
  for name in ('kernel', 'embedding'):
    if f'{module}/{name}' in flat:
      return name
  return 'kernel'  # quantised: the merged kernel takes this name


def _dequantised(spec: LowRank, flat: dict, module: str, shape) -> jax.Array:
  q = {k[len(module) + 1 + len(NF4_PREFIX):]: v for k, v in flat.items()
       if k.startswith(f'{module}/{NF4_PREFIX}')}
  dequantise = lambda qi, shape: nf4.dequantize(qi, shape, jnp.float32,
                                                block_size=spec.block_size)
  if _stacked(module):
    return jax.vmap(lambda qi: dequantise(qi, shape[1:]))(q)
  return dequantise(q, shape)


def prepare(params, spec: LowRank):
  """Finishes an adapted tree whose base weights were just loaded or initialised.

  DoRA: each magnitude becomes the column norm of its (loaded) kernel. QLoRA: each adapted
  kernel is replaced by its NF4 form (nf4_* leaves); float32 base weights stay float32.
  """
  flat = rules.flatten(params)
  if not _modules(flat):
    layers_found = sorted({p.rsplit('/', 1)[0] for p in flat
                           if p.endswith(('/kernel', '/embedding'))})
    raise ValueError(f'config.adapt.lora.targets {spec.targets!r} matches no Dense, Conv or Embed '
                     f'module, so {spec.method} would train nothing but the head: fix the regex '
                     f'(it searches module paths such as {layers_found[:4]}), and build the '
                     'tree with module.init inside lora.applied.')
  for module in _modules(flat):
    if spec.method == 'dora':
      flat[f'{module}/dora_magnitude'] = jnp.linalg.norm(
          flat[f'{module}/kernel'].astype(jnp.float32), axis=-2)
    if spec.method == 'qlora' and f'{module}/kernel' in flat:
      kernel = flat.pop(f'{module}/kernel')
      quantise = lambda w: nf4.quantize(w, block_size=spec.block_size,
                                        double_quant=spec.double_quant)
      q = jax.vmap(quantise)(kernel) if _stacked(module) else quantise(kernel)
      for k, v in q.items():
        flat[f'{module}/{NF4_PREFIX}{k}'] = v
  return rules.unflatten(flat)


def merge(params, spec: LowRank):
  """The plain model's parameters: every branch folded into its base weight, adapters removed.

  QLoRA kernels are dequantised (float32) before the delta is added.
  """
  flat = rules.flatten(params)
  for module in _modules(flat):
    a, b = flat.pop(f'{module}/lora_a'), flat.pop(f'{module}/lora_b')
    name = _base_name(flat, module)
    delta = _delta(spec, a, b)
    if f'{module}/{NF4_PREFIX}codes' in flat:
      base = _dequantised(spec, flat, module, delta.shape)
      for k in [k for k in flat if k.startswith(f'{module}/{NF4_PREFIX}')]:
        del flat[k]
    else:
      base = flat[f'{module}/{name}']
    merged = base.astype(jnp.float32) + delta
    if spec.method == 'dora':
      magnitude = flat.pop(f'{module}/dora_magnitude')
      merged = merged * (magnitude / jnp.linalg.norm(merged, axis=-2))[..., None, :]
    flat[f'{module}/{name}'] = merged.astype(base.dtype if spec.method != 'qlora' else
                                            jnp.float32)
  return rules.unflatten(flat)


def unmerge(merged_params, adapter_params, spec: LowRank):
  """Undoes `merge` for LoRA: the base weights back, with the branches of `adapter_params`.

  adapter_params: any tree holding the lora_a / lora_b leaves (e.g. the adapted tree itself).
  DoRA's merge rescales by a norm that depends on the lost base weight; keep the adapted tree
  (merging is a pure function that leaves it intact) instead of unmerging.
  """
  if spec.method != 'lora':
    raise ValueError(f'unmerge undoes LoRA merges only; for {spec.method} keep the adapted tree '
                     '(merge does not modify it).')
  flat = rules.flatten(merged_params)
  adapters = rules.flatten(adapter_params)
  for module in _modules(adapters):
    a, b = adapters[f'{module}/lora_a'], adapters[f'{module}/lora_b']
    name = _base_name(flat, module)
    base = flat[f'{module}/{name}']
    flat[f'{module}/{name}'] = (base.astype(jnp.float32) - _delta(spec, a, b)).astype(base.dtype)
    flat[f'{module}/lora_a'], flat[f'{module}/lora_b'] = a, b
  return rules.unflatten(flat)
