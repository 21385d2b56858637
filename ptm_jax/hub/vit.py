"""ViT checkpoints <-> ptm_jax.models.vit.

Two formats:
  * transformers' ViTModel / ViTForImageClassification folders (FAMILY, used by from_pretrained
    and save_pretrained);
  * the google-research/vision_transformer .npz files (`from_npz`).
Both load at a different image size than the checkpoint's: the position table is resampled
(models.vit.resample_position_embeddings, bicubic).
"""

import dataclasses
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptm_jax.hub import checkpoint_io
from ptm_jax.hub import convert
from ptm_jax.hub import pretrained
from ptm_jax.hub.checkpoint_io import CheckpointError
from ptm_jax.models import vit

log = logging.getLogger(__name__)

_BLOCK_NAMES = {
    'query': 'attention.attention.query', 'key': 'attention.attention.key',
    'value': 'attention.attention.value', 'out': 'attention.output.dense',
    'ln_attention': 'layernorm_before', 'fc_in': 'intermediate.dense',
    'fc_out': 'output.dense', 'ln_mlp': 'layernorm_after',
}
_BASE = ('params', 'vit')


def rules(config: vit.ViTConfig, head: str | None) -> list[convert.Rule]:
  """transformers' checkpoint keys (the names it writes to safetensors)."""
  if config.pool_type != 'cls':
    raise ValueError(f"transformers' ViT has a class token; pool_type {config.pool_type!r} "
                     'cannot be stored in its format.')
  if head == 'classification' and config.representation_size is not None:
    raise ValueError("transformers' ViTForImageClassification has no pre-logits layer; a "
                     'model with representation_size cannot be stored in its format.')
  p = 'vit.' if head is not None else ''  # transformers' base_model_prefix
  emb = f'{p}embeddings'
  out = [convert.same(f'{emb}.cls_token', _BASE + ('cls_token',)),
         convert.same(f'{emb}.position_embeddings', _BASE + ('position_embeddings',))]
  out.append(convert.conv_kernel(f'{emb}.patch_embeddings.projection.weight',
                                 _BASE + ('patch_embedding', 'projection', 'kernel')))
  out.append(convert.same(f'{emb}.patch_embeddings.projection.bias',
                          _BASE + ('patch_embedding', 'projection', 'bias')))
  for i in range(config.num_layers):
    out += convert.attention_block(f'{p}encoder.layer.{i}', _BASE + (f'layer_{i}',),
                                   _BLOCK_NAMES)
  out += convert.layer_norm(f'{p}layernorm', _BASE + ('final_ln',))
  if head is None and config.add_pooling_layer:
    out += convert.linear(f'{p}pooler.dense', _BASE + ('pooler',))
  if head == 'classification':
    out += convert.linear('classifier', ('params', 'classifier'))
  return out


def _square_side(n: int) -> int | None:
  side = math.isqrt(n) if n > 0 else 0
  return side if side > 1 and side * side == n else None


def adapt_tensor(key: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """Resamples a position table to the model's (square) grid; None for anything else."""
  if not (key.endswith('position_embeddings') or key.endswith('posembed_input/pos_embedding')):
    return None
  if array.ndim != 3 or len(shape) != 3 or array.shape[::2] != shape[::2]:
    return None
  # The class token row is there when both tables are 1 + a square: N = k^2 and N - 1 = j^2
  # hold together only for N = 1, so the test is unambiguous.
  for n_cls in (1, 0):
    old, new = _square_side(array.shape[1] - n_cls), _square_side(shape[1] - n_cls)
    if old and new:
      log.info('Resampling %s from a %dx%d to a %dx%d grid.', key, old, old, new, new)
      return vit.resample_position_embeddings(array, new, has_cls=bool(n_cls))
  return None


FAMILY = convert.Family(
    name='vit',
    model_types=('vit',),
    config_cls=vit.ViTConfig,
    architectures={'ViTModel': None, 'ViTForImageClassification': 'classification'},
    make_module=lambda config, **kw: vit.ViT(config, **kw),
    rules=rules,
    prefix='vit.',
    adapt_tensor=adapt_tensor,
)


# --- google-research/vision_transformer .npz ---------------------------------------------------

def _npz_rule(key: str, path, to_flax, hf_shape) -> convert.Rule:
  # to_flax only merges axes, so a checkpoint of another width reaches the loader's clear
  # shape-mismatch error instead of failing inside a reshape.
  return convert.Rule(key, (path,), lambda a: (to_flax(a),),
                      lambda arrays: arrays[0].reshape(hf_shape))


def npz_rules(config: vit.ViTConfig, head: str | None) -> list[convert.Rule]:
  """The .npz keys ('Transformer/encoderblock_0/...') of google-research/vision_transformer.

  With head=None the 'pre_logits' layer (dense + tanh, as transformers' pooler) becomes the
  pooler when config.add_pooling_layer is set.
  """
  d, n = config.hidden_size, config.num_heads
  dh = d // n
  same = lambda key, path: convert.same(key, path)
  out = [same('embedding/kernel', _BASE + ('patch_embedding', 'projection', 'kernel')),
         same('embedding/bias', _BASE + ('patch_embedding', 'projection', 'bias')),
         same('Transformer/posembed_input/pos_embedding', _BASE + ('position_embeddings',))]
  if config.pool_type == 'cls':
    out.append(same('cls', _BASE + ('cls_token',)))
  for i in range(config.num_layers):
    t = f'Transformer/encoderblock_{i}'
    layer = _BASE + (f'layer_{i}',)
    for ln, ours in (('LayerNorm_0', 'ln_attention'), ('LayerNorm_2', 'ln_mlp')):
      out += [same(f'{t}/{ln}/scale', layer + (ours, 'scale')),
              same(f'{t}/{ln}/bias', layer + (ours, 'bias'))]
    attention = f'{t}/MultiHeadDotProductAttention_1'
    for name in ('query', 'key', 'value'):
      path = layer + ('attention', name)
      # kernel (D, N, H) -> (D, N*H); bias (N, H) -> (N*H,)
      out += [_npz_rule(f'{attention}/{name}/kernel', path + ('kernel',),
                        lambda a: a.reshape(a.shape[0], -1), (d, n, dh)),
              _npz_rule(f'{attention}/{name}/bias', path + ('bias',),
                        lambda a: a.reshape(-1), (n, dh))]
    # out kernel (N, H, D) -> (N*H, D)
    out += [_npz_rule(f'{attention}/out/kernel', layer + ('attention', 'out', 'kernel'),
                      lambda a: a.reshape(-1, a.shape[-1]), (n, dh, d)),
            same(f'{attention}/out/bias', layer + ('attention', 'out', 'bias'))]
    for dense, ours in (('Dense_0', 'fc_in'), ('Dense_1', 'fc_out')):
      out += [same(f'{t}/MlpBlock_3/{dense}/kernel', layer + ('mlp', ours, 'kernel')),
              same(f'{t}/MlpBlock_3/{dense}/bias', layer + ('mlp', ours, 'bias'))]
  out += [same('Transformer/encoder_norm/scale', _BASE + ('final_ln', 'scale')),
          same('Transformer/encoder_norm/bias', _BASE + ('final_ln', 'bias'))]
  pre_logits = None
  if head is None and config.add_pooling_layer and config.pool_type == 'cls':
    pre_logits = _BASE + ('pooler',)
  if head == 'classification':
    out += [same('head/kernel', ('params', 'classifier', 'kernel')),
            same('head/bias', ('params', 'classifier', 'bias'))]
    if config.representation_size is not None:
      pre_logits = ('params', 'pre_logits')
  if pre_logits is not None:
    out += [same('pre_logits/kernel', pre_logits + ('kernel',)),
            same('pre_logits/bias', pre_logits + ('bias',))]
  return out


def from_npz(path: str, config: vit.ViTConfig, head: str | None = 'classification', *,
             dtype=jnp.float32, param_dtype=jnp.float32, reinit_head: bool = False,
             rng: jax.Array | None = None, **load_kwargs):
  """Loads a google-research/vision_transformer .npz into (module, variables).

  The .npz carries no config: pass the architecture (e.g. vit.PRESETS['vit-b/16'] with
  image_size, num_labels). What the file does determine is taken from it: pool_type ('gap'
  when it has no 'cls'), representation_size (its 'pre_logits' layer, if any) and, for head=None,
  add_pooling_layer (the pre-logits layer becomes transformers' pooler). A different image_size
  resamples the position table. Head weights are dropped for head=None; reinit_head=True gives
  the classifier fresh weights for config.num_labels classes (fine-tuning on a new label set).

  Numerics of the original code: LayerNorm eps 1e-6 (pass layer_norm_eps=1e-6) and flax's
  default GELU, the tanh approximation (hidden_act='gelu_new' reproduces it exactly; the
  checkpoints converted to transformers use the exact 'gelu', a ~1e-3 difference).
  load_kwargs go to pretrained.load_variables (shardings, mesh, rules, allow_unexpected_keys).
  """
  reader = checkpoint_io.NpzReader(path)
  keys = set(reader.keys())
  if config.layer_norm_eps != 1e-6:
    log.warning('layer_norm_eps is %g; the google-research ViT checkpoints use 1e-6.',
                config.layer_norm_eps)
  derived = {'pool_type': 'cls' if 'cls' in keys else 'gap'}
  has_pre_logits = 'pre_logits/kernel' in keys
  if head == 'classification':
    derived['representation_size'] = (reader.shape('pre_logits/kernel')[-1] if has_pre_logits
                                       else None)
  else:
    derived['add_pooling_layer'] = config.add_pooling_layer and has_pre_logits
  num_classes = reader.shape('head/kernel')[-1] if 'head/kernel' in keys else None
  if head == 'classification' and num_classes is None:
    raise CheckpointError(f'{path} has no head/kernel: load it with head=None.')
  if head == 'classification' and num_classes != config.num_labels and not reinit_head:
    raise CheckpointError(
        f'{path} has a {num_classes}-class head but config.num_labels is {config.num_labels}: '
        f'pass num_labels={num_classes}, or reinit_head=True for a fresh '
        f'{config.num_labels}-class head.')
  for name, value in derived.items():
    if getattr(config, name) != value:
      log.warning('from_npz: %s=%r, as the checkpoint holds (config said %r).', name, value,
                  getattr(config, name))
  config = dataclasses.replace(config, **derived)
  module = vit.ViT(config, head=head, dtype=dtype, param_dtype=param_dtype)

  # Load the checkpoint's own head (its class count), then swap in a fresh one if asked.
  load_config = config
  if head == 'classification' and reinit_head:
    # The checkpoint's head, without config's names (they are the new head's).
    load_config = dataclasses.replace(config, num_labels=num_classes, id2label=None,
                                      label2id=None)
  skip = ('^head/',) if head is None else ()
  if head is None and not (config.add_pooling_layer and config.pool_type == 'cls'):
    skip += ('^pre_logits/',)
  family = dataclasses.replace(FAMILY, name='vit (npz)', prefix='')
  load_module = vit.ViT(load_config, head=head, dtype=dtype, param_dtype=param_dtype)
  variables = pretrained.load_variables(
      load_module, family, reader, head=head, key_rules=npz_rules(load_config, head),
      skip_keys=skip + tuple(load_kwargs.pop('skip_keys', ())), **load_kwargs)
  if load_config is not config:
    rng = jax.random.key(0) if rng is None else rng

    @jax.jit  # XLA computes only the classifier, not the whole model.
    def fresh_head(rng):
      return nn.unbox(module.init(rng, **module.example_inputs()))['params']['classifier']

    variables['params']['classifier'] = fresh_head(rng)
    log.warning('from_npz: initialised a new %d-class classifier.', config.num_labels)
  return module, variables
