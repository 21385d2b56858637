"""Prefix tuning and prompt tuning for the transformer families, without touching the model code.

Both are added by Flax method interceptors (`nn.intercept_methods`) on the shared blocks of
`ptm_jax.models.layers` (GPT-2, BERT, ViT, CLIP); the base checkpoint loads unchanged and the
added parameters are leaves of their own. Shapes: B batch, T tokens, P prefix or prompt length,
D model width, L layers.

Prefix tuning (Li & Liang 2021)
  Attention layer l attends to P trained keys/values of its own besides the sequence's:
  attention(q, [K_l; k], [V_l; v]). They enter after the key/value projections (and after the
  KV cache, so decoding works), through the no-op hook `MultiHeadAttention.extend_keys`. Every
  query sees every prefix: a causal model gets an explicit mask (query i sees the P prefixes and
  the keys <= i), and a padding mask gains P visible columns. In training the prefixes are
  reparameterised by one MLP shared by all layers (the paper's stabilisation), computed once per
  forward in the scope of the outermost module whose config has `num_layers` (the GPT2 / Bert /
  ViT model itself; each CLIP tower):

    prefix_encoder/embedding (P, D) -> prefix_encoder/hidden (D -> hidden = 512), tanh
      -> prefix_encoder/out (hidden -> L * 2 * D) -> (P, L, 2, D): layer l's keys [:, l, 0],
      values [:, l, 1]

  Init: embedding N(0, 1) and kernels U(+-1/sqrt(fan_in)), as PyTorch's Embedding and Linear
  (the reference implementation's modules) draw them; biases 0, where PyTorch draws
  U(+-1/sqrt(fan_in)) too. The tokens keep their positions 0 .. T-1: PEFT's prefix tuning of
  GPT-2 passes the prefixes as past keys and values, which shifts the tokens to P .. P+T-1, so a
  prefix trained there is not one trained here. `drop_reparameterisation` then computes the
  prefixes once and stores them per layer, '<...>/layer_<l>/attention/prefix_key' and
  'prefix_value' (P, D), without the MLP; that tree runs in the same `applied` context, scanned
  stacks included (after `layers.stack_layers`). Training through the MLP needs the blocks as
  layer_0 ... layer_{L-1} (config.model.scan_layers=False): inside a scan a block cannot tell
  which layer it is.

Prompt tuning (Lester et al. 2021)
  P soft tokens, the parameter '<...>/layer_0/prompt' (P, D), are put in front of the sequence at
  the input of the first block, i.e. after the token and position embeddings (and after BERT's
  embedding LayerNorm and CLIP vision's pre-LayerNorm). Why there: the real tokens keep exactly
  the positions, and hence the inputs, the checkpoint was trained with, and the prompts take no
  row of the position table (no shorter maximum length). Every block sees the padding mask
  extended by P visible columns; a causal model needs no more (prompts come first, so every
  token sees all of them). The last block drops the P prompt positions again, so every output
  keeps its (B, T, ...) shape: a causal LM's logits line up with its labels, BERT's and ViT's
  poolers and classifiers still read [CLS] at position 0 (ViT 'gap' averages the real tokens
  only), and CLIP's text pooling finds its EOS where it was. Bidirectional attention is
  indifferent to the order of position-free tokens, so prompts in front equal prompts after [CLS].
  Init: 'uniform' draws U(-0.5, 0.5) (Lester et al.'s random init); 'vocab' takes P distinct rows
  of the word-embedding table, drawn uniformly (Lester et al. draw from the 5,000 most frequent
  tokens; no frequencies are at hand here). The rows must come from the loaded checkpoint, which
  `module.init` has not seen: init draws U(-0.5, 0.5), and `init_prompts_from_vocabulary` (called
  by `methods.prepare`) replaces them after the base weights are in place; CLIP's image tower,
  which has no vocabulary, keeps the uniform draw (an image-only model refuses 'vocab'). Prompt
  tuning needs the looped stack (config.model.scan_layers=False) and does not run with
  decode=True.
"""

import contextlib
import dataclasses
import re

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ptm_jax.adapt import config as adapt_config_lib
from ptm_jax.adapt import rules
from ptm_jax.models import layers

ENCODER = 'prefix_encoder'
PROMPT_PATH = r'(^|/)layer_0/prompt$'
# Word-embedding tables, by family: GPT-2, BERT, CLIP text.
WORD_EMBEDDINGS = ('wte', 'word_embeddings', 'token_embedding')
_LAYER = re.compile(r'layer_(\d+)$')


@dataclasses.dataclass(frozen=True)
class Prefix:
  """The `config.adapt.prefix` keys."""
  length: int = 10
  hidden: int = 512

  def __post_init__(self):
    if self.length < 1 or self.hidden < 1:
      raise ValueError(f'config.adapt.prefix.length and .hidden must be >= 1, got {self.length} '
                       f'and {self.hidden}.')

  @classmethod
  def from_config(cls, adapt_config: ml_collections.ConfigDict) -> 'Prefix':
    c = adapt_config_lib.merged_config(adapt_config)
    return cls(length=int(c.prefix.length), hidden=int(c.prefix.hidden))


@dataclasses.dataclass(frozen=True)
class Prompt:
  """The `config.adapt.prompt` keys."""
  length: int = 10
  init: str = 'vocab'  # or 'uniform'

  def __post_init__(self):
    if self.length < 1:
      raise ValueError(f'config.adapt.prompt.length must be >= 1, got {self.length}.')
    if self.init not in ('vocab', 'uniform'):
      raise ValueError(f"config.adapt.prompt.init must be 'vocab' or 'uniform', got "
                       f'{self.init!r}.')

  @classmethod
  def from_config(cls, adapt_config: ml_collections.ConfigDict) -> 'Prompt':
    c = adapt_config_lib.merged_config(adapt_config)
    return cls(length=int(c.prompt.length), init=c.prompt.init)


# PyTorch's nn.Linear init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
_torch_linear_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _uniform(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, dtype, -0.5, 0.5)


class PrefixEncoder(nn.Module):
  """The reparameterisation MLP: () -> prefixes (L, 2, P, D); [:, 0] keys, [:, 1] values."""
  length: int
  hidden: int
  num_layers: int
  width: int
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    embedding_PxD = self.param('embedding', nn.initializers.normal(1.0),
                               (self.length, self.width), self.param_dtype)
    dense = lambda n, name: nn.Dense(n, param_dtype=self.param_dtype, name=name,
                                     kernel_init=_torch_linear_init)
    h_PxM = jnp.tanh(dense(self.hidden, 'hidden')(embedding_PxD))
    out = dense(self.num_layers * 2 * self.width, 'out')(h_PxM)
    return out.reshape(self.length, self.num_layers, 2, self.width).transpose(1, 2, 0, 3)


class _Calls:
  """Where the interceptor is within one model call (module.init / apply)."""

  def __init__(self):
    self.depth = 0    # nesting of module methods; 0 = outside the model
    self.stacks = []  # per active module with config.num_layers: {'num_layers', 'prefixes'}
    self.seen = 0     # attention layers or blocks met during this model call


def _owns_stack(module, method_name: str) -> bool:
  config = getattr(module, 'config', None)
  return (method_name == '__call__' and hasattr(config, 'num_layers')
          and hasattr(config, 'hidden_size'))


def _layer_index(module, method: str) -> int:
  """The block index from the module path ('.../layer_3/...'); scanned stacks have none."""
  for name in reversed(module.path):
    if m := _LAYER.match(name):
      return int(m.group(1))
  raise ValueError(f'{method} needs the transformer blocks as layer_0 ... layer_{{L-1}}, but '
                   f'{"/".join(module.path)} is in a scanned stack (a block cannot tell which '
                   'layer it is): set config.model.scan_layers=False.')


def _with_visible(mask, p: int, queries_too: bool = False):
  """mask (..., T, S) with P always-visible keys in front (and P query rows, if asked).

  A query row of a prompt sees the P prompts and the keys that EVERY query may see: what a
  prompt gathers, all the tokens read from it in the next block, so a key hidden from some
  query (padding; a later token under a causal or block mask) must stay hidden from the
  prompts too. For a padding mask (..., 1, S) that is the mask itself.
  """
  if mask is None:
    return None
  mask = jnp.concatenate([jnp.ones((*mask.shape[:-1], p), bool), mask.astype(bool)], axis=-1)
  if queries_too and mask.shape[-2] > 1:
    seen_by_all = jnp.all(mask, axis=-2, keepdims=True)                    # (..., 1, P + S)
    mask = jnp.concatenate(
        [jnp.broadcast_to(seen_by_all, (*mask.shape[:-2], p, mask.shape[-1])), mask], axis=-2)
  return mask


def _interceptor(hook, root_check: str, make_stack):
  """Tracks the model call (the outermost method, the modules that own a stack) around `hook`.

  hook(calls, next_fun, args, kwargs, context) -> output or None (None: not a hooked call).
  make_stack(module) -> the entry pushed for a module whose config has num_layers.
  """
  calls = _Calls()

  def intercept(next_fun, args, kwargs, context):
    module, name = context.module, context.method_name
    if name == 'setup':
      return next_fun(*args, **kwargs)
    hooked = hook(calls, next_fun, args, kwargs, context)
    if hooked is not None:
      calls.seen += 1
      return hooked
    root = calls.depth == 0
    if root:
      calls.seen, calls.stacks = 0, []
    pushed = False
    calls.depth += 1
    try:
      if _owns_stack(module, name):  # inside the same model (GPT2 -> GPT2Transformer): shared
        calls.stacks.append(calls.stacks[-1] if calls.stacks else make_stack(module))
        pushed = True
      out = next_fun(*args, **kwargs)
    finally:
      calls.depth -= 1
      if pushed:
        calls.stacks.pop()
    if root and not calls.seen:
      raise ValueError(f'{root_check} found no transformer block in {type(module).__name__} '
                       '(ResNet has none): use lora, full or frozen for this model.')
    return out

  return intercept


# ------------------------------------------------------------------------------------------------
# Prefix tuning.


def _encoded_prefixes(spec: Prefix, module) -> dict:
  """The stack's entry: prefixes (L, 2, P, D) from the MLP, or None for a tree without it."""
  cfg = module.config
  entry = {'num_layers': cfg.num_layers, 'prefixes': None}
  if module.is_initializing() or module.has_variable('params', ENCODER):
    # Created in `module`'s scope: the interceptor runs inside its compact __call__.
    encoder = PrefixEncoder(spec.length, spec.hidden, cfg.num_layers, cfg.hidden_size,
                            param_dtype=getattr(module, 'param_dtype', jnp.float32), name=ENCODER)
    entry['prefixes'] = encoder()
  return entry


def _extend_keys(spec: Prefix, calls: _Calls, module, k_BxSxNxH, v_BxSxNxH, mask, causal):
  """extend_keys with the layer's prefixes in front of the keys and values."""
  b, s, n, h = k_BxSxNxH.shape
  if module.has_variable('params', 'prefix_key'):  # the per-layer form, MLP dropped
    key_PxD = module.get_variable('params', 'prefix_key')
    value_PxD = module.get_variable('params', 'prefix_value')
  else:
    entry = calls.stacks[-1] if calls.stacks else None
    if entry is None or entry['prefixes'] is None:
      raise ValueError(f'{"/".join(module.path)} has no prefixes: the parameters hold neither '
                       f'{ENCODER}/ (the MLP) nor per-layer prefix_key/prefix_value. Build them '
                       'with module.init inside methods.applied (config.adapt.method=prefix).')
    prefixes = entry['prefixes'][_layer_index(module, 'Prefix tuning through its MLP')]
    key_PxD, value_PxD = prefixes[0], prefixes[1]
  p = key_PxD.shape[0]
  if key_PxD.shape[-1] != n * h:
    raise ValueError(f'Prefixes of width {key_PxD.shape[-1]} do not fit the {n} x {h} heads of '
                     f'{"/".join(module.path)}.')
  expand = lambda x_PxD: jnp.broadcast_to(x_PxD.reshape(1, p, n, h), (b, p, n, h)).astype(
      k_BxSxNxH.dtype)
  keys = jnp.concatenate([expand(key_PxD), k_BxSxNxH], axis=1)
  values = jnp.concatenate([expand(value_PxD), v_BxSxNxH], axis=1)
  if causal:  # (no KV cache: queries are the keys) query i sees keys <= i, then all prefixes
    causal_1x1xSxS = jnp.tril(jnp.ones((s, s), bool))[None, None]
    mask = causal_1x1xSxS if mask is None else jnp.logical_and(mask, causal_1x1xSxS)
  return keys, values, _with_visible(mask, p), False


def prefix_interceptor(spec: Prefix):
  """A `nn.intercept_methods` interceptor that adds per-layer key/value prefixes."""

  def hook(calls, next_fun, args, kwargs, context):
    if context.method_name == 'extend_keys' and isinstance(context.module,
                                                           layers.MultiHeadAttention):
      return _extend_keys(spec, calls, context.module, *args, **kwargs)
    return None

  return _interceptor(hook, 'config.adapt.method=prefix',
                      lambda module: _encoded_prefixes(spec, module))


def drop_reparameterisation(params) -> dict:
  """Prefix-tuned params -> the same prefixes stored per layer, the MLP dropped.

  Every '<stack>prefix_encoder/...' subtree becomes '<stack>.../layer_<l>/attention/prefix_key'
  and 'prefix_value' (P, D) for each of its L layers. The result computes the same outputs in
  `applied` (with config.adapt.method=prefix).
  """
  flat = rules.flatten(params)
  stacks = sorted({p[:m.start(2)] for p in flat if (m := re.search(rf'(^|/)({ENCODER})/', p))})
  for stack in stacks:
    head = f'{stack}{ENCODER}/'
    encoder = rules.unflatten({k[len(head):]: flat.pop(k) for k in list(flat)
                               if k.startswith(head)})
    attention = {}
    for path in flat:
      m = re.fullmatch(rf'{re.escape(stack)}(.*/)?layer_(\d+)/attention/key/kernel', path)
      if m:
        attention[int(m.group(2))] = path[:-len('/key/kernel')]
    if not attention or sorted(attention) != list(range(len(attention))):
      raise ValueError(f'{head} has no attention layers layer_0 ... layer_{{L-1}} beside it '
                       '(a scanned tree? unstack it first with layers.unstack_layers).')
    length, width = encoder['embedding'].shape
    num_layers = encoder['out']['kernel'].shape[-1] // (2 * width)
    if num_layers != len(attention):
      raise ValueError(f'{head} makes prefixes for {num_layers} layers but {len(attention)} '
                       'attention layers are beside it.')
    prefixes = PrefixEncoder(length, encoder['hidden']['kernel'].shape[-1], num_layers, width,
                             param_dtype=encoder['embedding'].dtype).apply({'params': encoder})
    for layer, path in attention.items():
      flat[f'{path}/prefix_key'] = prefixes[layer, 0]
      flat[f'{path}/prefix_value'] = prefixes[layer, 1]
  return rules.unflatten(flat)


# ------------------------------------------------------------------------------------------------
# Prompt tuning.


def _prompted_block(spec: Prompt, calls: _Calls, module, next_fun, args, kwargs):
  """One block with the prompts in the sequence: added before layer 0, dropped after the last."""
  layer = _layer_index(module, 'Prompt tuning')
  if kwargs.get('decode'):
    raise ValueError('Prompt tuning does not run with decode=True (KV-cache generation): the '
                     'cache would need the prompts first. Generate with use_cache=False.')
  if not calls.stacks:
    raise ValueError(f'Prompt tuning needs the block {"/".join(module.path)} inside a model '
                     'whose config has num_layers (GPT2, Bert, ViT, a CLIP tower).')
  args = list(args)
  x_BxTxD = args[0]
  mask = args[1] if len(args) > 1 else kwargs.pop('mask', None)
  b, _, d = x_BxTxD.shape
  p = spec.length
  if layer == 0:
    prompt_PxD = module.param('prompt', nn.with_logical_partitioning(_uniform, (None, 'embed')),
                              (p, d), module.param_dtype)
    x_BxTxD = jnp.concatenate(
        [jnp.broadcast_to(prompt_PxD.astype(x_BxTxD.dtype)[None], (b, p, d)), x_BxTxD], axis=1)
  y_BxTxD = next_fun(x_BxTxD, _with_visible(mask, p, queries_too=True), *args[2:], **kwargs)
  if layer == calls.stacks[-1]['num_layers'] - 1:
    return y_BxTxD[:, p:]
  return y_BxTxD


def prompt_interceptor(spec: Prompt):
  """A `nn.intercept_methods` interceptor that puts soft prompt tokens before the sequence."""

  def hook(calls, next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, layers.TransformerBlock):
      return _prompted_block(spec, calls, context.module, next_fun, args, dict(kwargs))
    return None

  return _interceptor(hook, 'config.adapt.method=prompt',
                      lambda module: {'num_layers': module.config.num_layers})


def init_prompts_from_vocabulary(params, spec: Prompt, rng: jax.Array) -> dict:
  """'vocab' init: each prompt becomes P distinct rows of its tower's word-embedding table.

  Call after the base weights are in place (the rows are the checkpoint's). A no-op for
  'uniform'. A tower with no such table (CLIP's image tower) keeps its U(-0.5, 0.5) prompts; a
  model with none at all (ViT, ResNet) is refused.
  """
  if spec.init != 'vocab':
    return params
  flat = rules.flatten(params)
  prompt_paths = sorted(p for p in flat if re.search(PROMPT_PATH, p))
  without_table = []
  for i, path in enumerate(prompt_paths):
    stack = path[:-len('layer_0/prompt')]
    tables = [f'{stack}{name}/embedding' for name in WORD_EMBEDDINGS
              if f'{stack}{name}/embedding' in flat]
    if not tables:
      without_table.append(path)
      continue
    table_VxD = flat[tables[0]]
    rows = jax.random.choice(jax.random.fold_in(rng, i), table_VxD.shape[0], (spec.length,),
                             replace=spec.length > table_VxD.shape[0])
    flat[path] = table_VxD[rows].astype(flat[path].dtype)
  if without_table:
    if len(without_table) == len(prompt_paths):
      raise ValueError("config.adapt.prompt.init='vocab' takes rows of the word embeddings, but "
                       f'{without_table[0]} has no word-embedding table beside it (an image '
                       "model): set config.adapt.prompt.init='uniform'.")
    logging.info('prompt.init=vocab: %s has no word-embedding table beside it (an image tower) '
                 'and keeps its U(-0.5, 0.5) init.', ', '.join(without_table))
  return rules.unflatten(flat)


@contextlib.contextmanager
def applied(spec: Prefix | Prompt | None):
  """`with applied(spec): module.init(...) / module.apply(...)` runs the prefix/prompt model."""
  if spec is None:
    yield
    return
  make = prefix_interceptor if isinstance(spec, Prefix) else prompt_interceptor
  with nn.intercept_methods(make(spec)):
    yield
