"""Vision Transformer (ViT): patches + [CLS] + learned positions, pre-LN blocks, a final LayerNorm.

Heads, by `ViT.head` (the transformers architecture in brackets):
  None              (ViTModel)                    last_hidden_state (B, T, D), pooler_output (B, D')
  'classification'  (ViTForImageClassification)  logits (B, K)

T = 1 + number of patches with pool_type 'cls', the number of patches with 'gap' (no class
token, as the google-research/vision_transformer 'gap' models). The classifier reads the CLS
token (or the mean of all tokens for 'gap') after the final LayerNorm, optionally through the
pre-logits layer (dense + tanh) of `representation_size`. The bare model's pooler_output is
transformers' ViTPooler: pooler_act(dense(CLS)); with 'gap' it is the token mean (no weights).

Inputs are NHWC float images (B, H, W, C), already normalised as the checkpoint expects.
"""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptm_jax.models import labels
from ptm_jax.models import layers
from ptm_jax.models import outputs

HEADS = (None, 'classification')
POOL_TYPES = ('cls', 'gap')


def _pair(value, name: str) -> int | tuple[int, int]:
  """An int, or a (H, W) tuple when the two differ (config.json may hold a list)."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2:
      raise ValueError(f'{name} must be an int or a (height, width) pair, got {value!r}.')
    h, w = int(value[0]), int(value[1])
    return h if h == w else (h, w)
  return int(value)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  # transformers' default; timm and the original JAX ViT (flax nn.LayerNorm) use 1e-6.
  layer_norm_eps: float = 1e-12
  image_size: int | tuple[int, int] = 224
  patch_size: int = 16
  num_channels: int = 3
  dropout: float = 0.0
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  qkv_bias: bool = True
  num_labels: int = 2
  # Class names by id, transformers' label2id and problem_type (see models.labels).
  id2label: tuple[str, ...] | None = labels.field()
  label2id: tuple[tuple[str, int], ...] | None = labels.field()
  problem_type: str | None = labels.field()
  pooler_output_size: int | None = None  # None: hidden_size, as in transformers.
  pooler_act: str = 'tanh'
  # Our own fields (no transformers counterpart).
  pool_type: str = 'cls'
  representation_size: int | None = None
  add_pooling_layer: bool = True  # False for ViTModel checkpoints saved without the pooler.

  # Our field -> transformers' config.json key.
  HF_NAMES: ClassVar[dict[str, str]] = {
      'num_layers': 'num_hidden_layers', 'num_heads': 'num_attention_heads',
      'dropout': 'hidden_dropout_prob', 'attention_dropout': 'attention_probs_dropout_prob'}

  def __post_init__(self):
    labels.normalise(self)
    object.__setattr__(self, 'image_size', _pair(self.image_size, 'image_size'))
    patch = _pair(self.patch_size, 'patch_size')
    if not isinstance(patch, int):
      raise NotImplementedError(f'Non-square patches {patch} are not implemented; use a square '
                                'patch_size.')
    object.__setattr__(self, 'patch_size', patch)
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads '
                       f'{self.num_heads}.')
    h, w = self.image_hw
    if h % patch or w % patch:
      raise ValueError(f'image_size {h}x{w} is not divisible by patch_size {patch}: pick an '
                       f'image_size that is a multiple of {patch}.')
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f'Unknown pool_type {self.pool_type!r}; choose one of {POOL_TYPES}.')
    if not self.qkv_bias:
      raise NotImplementedError('ViT with qkv_bias=False is not implemented; only the released '
                                'ViT checkpoints (qkv_bias=True) are.')
    layers.activation(self.hidden_act)  # Fails early on an unknown activation.
    layers.activation(self.pooler_act)

  @property
  def image_hw(self) -> tuple[int, int]:
    s = self.image_size
    return (s, s) if isinstance(s, int) else tuple(s)

  @property
  def grid(self) -> tuple[int, int]:
    """Patches along (H, W)."""
    h, w = self.image_hw
    return h // self.patch_size, w // self.patch_size

  @property
  def num_tokens(self) -> int:
    gh, gw = self.grid
    return gh * gw + (1 if self.pool_type == 'cls' else 0)


_SIZES = {  # name: (hidden_size, num_layers, num_heads, intermediate_size), as in the ViT paper.
    'ti': (192, 12, 3, 768),
    's': (384, 12, 6, 1536),
    'b': (768, 12, 12, 3072),
    'l': (1024, 24, 16, 4096),
    'h': (1280, 32, 16, 5120),
}
PRESETS = {
    f'vit-{name}/{patch}': ViTConfig(hidden_size=d, num_layers=n, num_heads=h,
                                     intermediate_size=m, patch_size=patch)
    for name, (d, n, h, m) in _SIZES.items() for patch in (14, 16, 32)
}


def resample_position_embeddings(posemb_1xNxD, new_grid, has_cls: bool, old_grid=None,
                                 method: str = 'bicubic') -> np.ndarray:
  """Resizes a ViT position table to a new patch grid; the class-token row is kept as is.

  posemb_1xNxD: (1, [1 +] gh * gw, D). new_grid: int or (gh', gw'). old_grid defaults to the
  square grid that N implies. The grid is resized with jax.image.resize (bicubic by default,
  antialiased when shrinking); timm and transformers also use bicubic, google-research's
  fine-tuning code bilinear, so resampled tables match neither to the last digit.
  Returns a float32 (1, [1 +] gh' * gw', D) numpy array.
  """
  posemb = np.asarray(posemb_1xNxD, np.float32)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'Expected a (1, N, D) position table, got shape {posemb.shape}.')
  n_cls = 1 if has_cls else 0
  head_1xCxD, grid_1xPxD = posemb[:, :n_cls], posemb[:, n_cls:]
  p, d = grid_1xPxD.shape[1:]
  if old_grid is None:
    side = int(round(np.sqrt(p)))
    if side * side != p:
      raise ValueError(f'{p} position rows (has_cls={has_cls}) are not a square grid: pass '
                       'old_grid=(height, width).')
    old_grid = (side, side)
  old_grid = (old_grid, old_grid) if isinstance(old_grid, int) else tuple(old_grid)
  new_grid = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
  if old_grid[0] * old_grid[1] != p:
    raise ValueError(f'old_grid {old_grid} does not hold the {p} position rows.')
  if new_grid == old_grid:
    return posemb
  grid_HxWxD = grid_1xPxD.reshape(*old_grid, d)
  resized = jax.image.resize(jnp.asarray(grid_HxWxD), (*new_grid, d), method=method)
  resized_1xPxD = np.asarray(resized, np.float32).reshape(1, new_grid[0] * new_grid[1], d)
  return np.concatenate([head_1xCxD, resized_1xPxD], axis=1)


class ViTEncoder(nn.Module):
  """Patch embedding, [CLS], positions, the pre-LN blocks, the final LN and (optionally) pooler."""
  config: ViTConfig
  add_pooler: bool = True
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None
  layer_stack: layers.LayerStack = layers.LayerStack()  # remat / scan over the blocks

  @nn.compact
  def __call__(self, pixels_BxHxWxC, *, deterministic: bool = True):
    cfg = self.config
    if pixels_BxHxWxC.ndim != 4 or pixels_BxHxWxC.shape[-1] != cfg.num_channels:
      raise ValueError(
          f'pixel_values must be NHWC (batch, height, width, {cfg.num_channels}), got shape '
          f'{tuple(pixels_BxHxWxC.shape)}; NCHW arrays need x.transpose(0, 2, 3, 1).')
    b, h, w, _ = pixels_BxHxWxC.shape
    x_BxPxD = layers.PatchEmbedding(
        cfg.patch_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        init_std=cfg.initializer_range, name='patch_embedding')(pixels_BxHxWxC)
    grid = (h // cfg.patch_size, w // cfg.patch_size)
    if grid != cfg.grid:
      ch, cw = cfg.image_hw
      raise ValueError(
          f'pixel_values are {h}x{w} but this ViT was built for image_size {ch}x{cw} (a '
          f'{cfg.grid[0]}x{cfg.grid[1]} grid of position embeddings): resize the images, or load '
          f"the model with config_overrides={{'image_size': {h if h == w else (h, w)}}} to "
          'resample its position embeddings.')

    param = lambda name, shape, axes: jnp.asarray(self.param(
        name, nn.with_logical_partitioning(layers.normal(cfg.initializer_range), axes), shape,
        self.param_dtype), self.dtype)
    x_BxTxD = x_BxPxD
    if cfg.pool_type == 'cls':
      cls_1x1xD = param('cls_token', (1, 1, cfg.hidden_size), (None, None, 'embed'))
      x_BxTxD = jnp.concatenate(
          [jnp.broadcast_to(cls_1x1xD, (b, 1, cfg.hidden_size)), x_BxPxD], axis=1)
    x_BxTxD = x_BxTxD + param('position_embeddings', (1, cfg.num_tokens, cfg.hidden_size),
                              (None, 'position', 'embed'))
    x_BxTxD = nn.Dropout(cfg.dropout)(x_BxTxD, deterministic=deterministic)

    x_BxTxD = layers.transformer_stack(
        x_BxTxD, num_layers=cfg.num_layers, deterministic=deterministic,
        num_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads,
        mlp_dim=cfg.intermediate_size, activation=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps, norm_first=True, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, dtype=self.dtype,
        param_dtype=self.param_dtype, init_std=cfg.initializer_range,
        attention_impl=self.attention_impl, layer_stack=self.layer_stack)
    x_BxTxD = layers.layer_norm(cfg.layer_norm_eps, name='final_ln', dtype=self.dtype,
                                param_dtype=self.param_dtype)(x_BxTxD)

    pooled = None
    if cfg.pool_type == 'gap':
      pooled = jnp.mean(x_BxTxD, axis=1)
    elif self.add_pooler:
      pooled = layers.activation(cfg.pooler_act)(layers.dense(
          cfg.pooler_output_size or cfg.hidden_size, ('embed', 'embed_out'), name='pooler',
          dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=layers.normal(cfg.initializer_range))(x_BxTxD[:, 0]))
    return outputs.BaseModelOutput(last_hidden_state=x_BxTxD, pooler_output=pooled)


class ViT(nn.Module):
  """ViT with one of the heads in HEADS. pixel_values: NHWC float (B, H, W, C)."""
  config: ViTConfig
  head: str | None = None
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None  # None (let JAX pick), 'xla' or 'cudnn'.
  layer_stack: layers.LayerStack = layers.LayerStack()  # remat / scan over the blocks

  @nn.compact
  def __call__(self, pixel_values, *, deterministic: bool = True):
    if self.head not in HEADS:
      raise ValueError(f'Unknown ViT head {self.head!r}; choose one of {HEADS}.')
    cfg = self.config
    encoded = ViTEncoder(
        cfg, add_pooler=self.head is None and cfg.add_pooling_layer, dtype=self.dtype,
        param_dtype=self.param_dtype, attention_impl=self.attention_impl,
        layer_stack=self.layer_stack, name='vit')(
            jnp.asarray(pixel_values), deterministic=deterministic)
    if self.head is None:
      return encoded
    x_BxTxD = encoded.last_hidden_state
    # transformers' classifier reads CLS after the final LN, with no pooler in between.
    features_BxD = x_BxTxD[:, 0] if cfg.pool_type == 'cls' else encoded.pooler_output
    dense = lambda n, axes, name: layers.dense(
        n, axes, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.normal(cfg.initializer_range))
    if cfg.representation_size is not None:
      features_BxD = jnp.tanh(dense(cfg.representation_size, ('embed', 'embed_out'),
                                    'pre_logits')(features_BxD))
    logits_BxK = dense(cfg.num_labels, ('embed', 'classes'), 'classifier')(features_BxD)
    return outputs.ClassifierOutput(logits=logits_BxK, last_hidden_state=x_BxTxD)

  def example_inputs(self, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Inputs that `init` and shape inference use: images at config.image_size."""
    h, w = self.config.image_hw
    return {'pixel_values': np.zeros((batch_size, h, w, self.config.num_channels), np.float32)}
