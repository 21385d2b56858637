"""CLIP: a causal text transformer and a ViT, projected into one embedding space.

`CLIP` matches transformers' CLIPModel:
  text:   token + position embeddings -> pre-LN causal blocks -> final LN -> the hidden state at
          the EOS token -> text_projection (no bias)
  vision: patch conv (no bias), class token, position embeddings -> pre_layrnorm -> pre-LN
          blocks -> post_layernorm on the class token -> visual_projection (no bias)
  logits = exp(logit_scale) * cosine similarity; logit_scale is stored as a log.

Inputs: int32 token ids (B_text, T) with an optional 1/0 attention mask, and NHWC float images
(B_image, H, W, C). Either modality may be left out of `__call__`; `encode_text`,
`encode_image` and `zero_shot_logits` run one tower (`module.apply(..., method='encode_text')`).
"""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptm_jax.models import layers
from ptm_jax.models import outputs

# Old CLIP configs say eos_token_id 2, and the EOS was then found as the largest token id
# (the real EOS, 49407, is the last row of the vocabulary); transformers keeps that behaviour.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  intermediate_size: int = 2048
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407

  HF_NAMES: ClassVar[dict[str, str]] = {
      'num_layers': 'num_hidden_layers', 'num_heads': 'num_attention_heads'}

  def __post_init__(self):
    _check_heads('CLIPTextConfig', self.hidden_size, self.num_heads)
    if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
      raise ValueError(f'CLIPTextConfig.eos_token_id must be one int (the id the text is pooled '
                       f'at), got {self.eos_token_id!r}.')


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02

  HF_NAMES: ClassVar[dict[str, str]] = {
      'num_layers': 'num_hidden_layers', 'num_heads': 'num_attention_heads'}

  def __post_init__(self):
    _check_heads('CLIPVisionConfig', self.hidden_size, self.num_heads)
    for name in ('image_size', 'patch_size'):
      if not isinstance(getattr(self, name), int):
        raise ValueError(f'CLIPVisionConfig.{name} must be one int (square images and patches), '
                         f'got {getattr(self, name)!r}.')
    if self.image_size % self.patch_size:
      raise ValueError(f'CLIPVisionConfig.image_size {self.image_size} is not divisible by '
                       f'patch_size {self.patch_size}.')

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
  vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592  # log(1 / 0.07), the paper's initial temperature

  HF_NAMES: ClassVar[dict[str, str]] = {}

  def __post_init__(self):
    for name, cls in (('text_config', CLIPTextConfig), ('vision_config', CLIPVisionConfig)):
      if not isinstance(getattr(self, name), cls):
        raise ValueError(f'CLIPConfig.{name} must be a {cls.__name__}, got '
                         f'{type(getattr(self, name)).__name__}; build it with '
                         f'{cls.__name__}(**fields).')


def _check_heads(what: str, hidden_size: int, num_heads: int):
  if hidden_size % num_heads:
    raise ValueError(f'{what}.hidden_size {hidden_size} is not divisible by num_heads '
                     f'{num_heads}.')


PRESETS = {
    'clip-vit-base-patch32': CLIPConfig(),
    'clip-vit-base-patch16': CLIPConfig(vision_config=CLIPVisionConfig(patch_size=16)),
    'clip-vit-large-patch14': CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=768, num_heads=12, intermediate_size=3072),
        vision_config=CLIPVisionConfig(hidden_size=1024, num_layers=24, num_heads=16,
                                       intermediate_size=4096, patch_size=14),
        projection_dim=768),
    'clip-tiny': CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=2,
                                   intermediate_size=128, max_position_embeddings=16,
                                   pad_token_id=0, bos_token_id=1022, eos_token_id=1023),
        vision_config=CLIPVisionConfig(hidden_size=64, num_layers=2, num_heads=2,
                                       intermediate_size=128, image_size=32, patch_size=8),
        projection_dim=32),
}


def _blocks(x_BxTxD, mask, *, causal, n, num_heads, mlp_dim, act, eps, attention_dropout,
            init_std, dtype, param_dtype, deterministic, layer_stack, attention_impl=None):
  """CLIP's pre-LN blocks (no residual dropout), named layer_0 ... layer_{n-1}."""
  return layers.transformer_stack(
      x_BxTxD, mask, num_layers=n, causal=causal, deterministic=deterministic,
      num_heads=num_heads, head_dim=x_BxTxD.shape[-1] // num_heads, mlp_dim=mlp_dim,
      activation=act, layer_norm_eps=eps, norm_first=True, dropout=0.0,
      attention_dropout=attention_dropout, dtype=dtype, param_dtype=param_dtype,
      init_std=init_std, attention_impl=attention_impl, layer_stack=layer_stack)


class CLIPTextTransformer(nn.Module):
  """Token ids (B, T) -> last_hidden_state (B, T, D) after final LN, pooler_output (B, D) at EOS."""
  config: CLIPTextConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None  # None (let JAX pick), 'xla' or 'cudnn'.
  layer_stack: layers.LayerStack = layers.LayerStack()  # remat / scan over the blocks

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxT=None, position_ids_BxT=None, *,
               deterministic: bool = True):
    cfg = self.config
    input_ids_BxT = jnp.asarray(input_ids_BxT)
    b, t = layers.check_token_inputs(input_ids_BxT, attention_mask_BxT)
    layers.check_length(t, cfg.max_position_embeddings)
    if position_ids_BxT is None:
      position_ids_BxT = jnp.arange(t)[None, :]
    emb = lambda n, name, axes: layers.embed(
        n, cfg.hidden_size, axes, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
        std=cfg.initializer_range)
    x_BxTxD = (emb(cfg.vocab_size, 'token_embedding', ('vocab', 'embed'))(input_ids_BxT)
               + emb(cfg.max_position_embeddings, 'position_embedding',
                     ('position', 'embed'))(position_ids_BxT))
    # The padding mask hides padded keys; the causal mask is combined with it inside attention.
    x_BxTxD = _blocks(
        x_BxTxD, layers.padding_mask(attention_mask_BxT), causal=True, n=cfg.num_layers,
        num_heads=cfg.num_heads, mlp_dim=cfg.intermediate_size, act=cfg.hidden_act,
        eps=cfg.layer_norm_eps, attention_dropout=cfg.attention_dropout,
        init_std=cfg.initializer_range, dtype=self.dtype, param_dtype=self.param_dtype,
        deterministic=deterministic, layer_stack=self.layer_stack,
        attention_impl=self.attention_impl)
    x_BxTxD = layers.layer_norm(cfg.layer_norm_eps, name='final_layer_norm', dtype=self.dtype,
                                param_dtype=self.param_dtype)(x_BxTxD)
    return outputs.BaseModelOutput(last_hidden_state=x_BxTxD,
                                   pooler_output=eos_pool(x_BxTxD, input_ids_BxT,
                                                          cfg.eos_token_id))


def eos_pool(x_BxTxD: jax.Array, input_ids_BxT: jax.Array, eos_token_id: int) -> jax.Array:
  """The hidden state at each row's first EOS (position 0 if a row has none) -> (B, D).

  With the legacy eos_token_id 2 it is the position of the largest id instead (transformers).
  """
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    pos_B = jnp.argmax(input_ids_BxT, axis=-1)
  else:  # argmax returns the first maximum, i.e. the first EOS.
    pos_B = jnp.argmax((input_ids_BxT == eos_token_id).astype(jnp.int32), axis=-1)
  return jnp.take_along_axis(x_BxTxD, pos_B[:, None, None], axis=1)[:, 0]


class CLIPVisionTransformer(nn.Module):
  """Images (B, H, W, C) -> last_hidden_state (B, 1 + P, D), pooler_output (B, D).

  pooler_output is post_layernorm of the class token; last_hidden_state is not normalised
  (as in transformers).
  """
  config: CLIPVisionConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None  # None (let JAX pick), 'xla' or 'cudnn'.
  layer_stack: layers.LayerStack = layers.LayerStack()  # remat / scan over the blocks

  @nn.compact
  def __call__(self, pixel_values_BxHxWxC, *, deterministic: bool = True):
    cfg = self.config
    pixel_values_BxHxWxC = jnp.asarray(pixel_values_BxHxWxC)
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values_BxHxWxC.ndim != 4 or pixel_values_BxHxWxC.shape[1:] != expected:
      raise ValueError(
          f'pixel_values must be NHWC images of shape (batch, {cfg.image_size}, '
          f'{cfg.image_size}, {cfg.num_channels}), got {pixel_values_BxHxWxC.shape}: resize the '
          f'images to image_size {cfg.image_size} (and transpose NCHW arrays to NHWC).')
    b = pixel_values_BxHxWxC.shape[0]
    d = cfg.hidden_size
    x_BxPxD = layers.PatchEmbedding(
        cfg.patch_size, d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        init_std=cfg.initializer_range, name='patch_embedding')(pixel_values_BxHxWxC)
    class_D = self.param('class_embedding', nn.with_logical_partitioning(
        layers.normal(d ** -0.5), ('embed',)), (d,), self.param_dtype)
    class_Bx1xD = jnp.broadcast_to(jnp.asarray(class_D, x_BxPxD.dtype), (b, 1, d))
    x_BxTxD = jnp.concatenate([class_Bx1xD, x_BxPxD], axis=1)
    positions = layers.embed(cfg.num_patches + 1, d, ('position', 'embed'),
                             name='position_embedding', dtype=self.dtype,
                             param_dtype=self.param_dtype, std=cfg.initializer_range)
    x_BxTxD = x_BxTxD + positions(jnp.arange(cfg.num_patches + 1))[None]
    ln = lambda name: layers.layer_norm(cfg.layer_norm_eps, name=name, dtype=self.dtype,
                                        param_dtype=self.param_dtype)
    # transformers spells this one `pre_layrnorm`; the checkpoint rules map the name.
    x_BxTxD = ln('pre_layernorm')(x_BxTxD)
    x_BxTxD = _blocks(
        x_BxTxD, None, causal=False, n=cfg.num_layers, num_heads=cfg.num_heads,
        mlp_dim=cfg.intermediate_size, act=cfg.hidden_act, eps=cfg.layer_norm_eps,
        attention_dropout=cfg.attention_dropout, init_std=cfg.initializer_range,
        dtype=self.dtype, param_dtype=self.param_dtype, deterministic=deterministic,
        layer_stack=self.layer_stack, attention_impl=self.attention_impl)
    return outputs.BaseModelOutput(last_hidden_state=x_BxTxD,
                                   pooler_output=ln('post_layernorm')(x_BxTxD[:, 0]))


def l2_normalize(x_BxE: jax.Array) -> jax.Array:
  """x / ||x|| along the last axis, in float32 (no epsilon, as transformers)."""
  x_BxE = x_BxE.astype(jnp.float32)
  return x_BxE / jnp.sqrt(jnp.sum(jnp.square(x_BxE), axis=-1, keepdims=True))


class CLIP(nn.Module):
  """CLIPModel. Embeddings, their normalisation and the logits are float32 whatever `dtype`."""
  config: CLIPConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None  # None (let JAX pick), 'xla' or 'cudnn'.
  layer_stack: layers.LayerStack = layers.LayerStack()  # remat / scan over the blocks

  def setup(self):
    cfg = self.config
    self.text_model = CLIPTextTransformer(cfg.text_config, dtype=self.dtype,
                                          param_dtype=self.param_dtype,
                                          attention_impl=self.attention_impl,
                                          layer_stack=self.layer_stack)
    self.vision_model = CLIPVisionTransformer(cfg.vision_config, dtype=self.dtype,
                                              param_dtype=self.param_dtype,
                                              attention_impl=self.attention_impl,
                                              layer_stack=self.layer_stack)
    projection = lambda d, name: layers.dense(
        cfg.projection_dim, ('embed', None), name=name, dtype=self.dtype,
        param_dtype=self.param_dtype, use_bias=False, kernel_init=layers.normal(d ** -0.5))
    self.text_projection = projection(cfg.text_config.hidden_size, 'text_projection')
    self.visual_projection = projection(cfg.vision_config.hidden_size, 'visual_projection')
    self.logit_scale = self.param(
        'logit_scale', nn.with_logical_partitioning(
            nn.initializers.constant(cfg.logit_scale_init_value), ()), (), self.param_dtype)

  def __call__(self, input_ids=None, attention_mask=None, pixel_values=None, position_ids=None, *,
               deterministic: bool = True) -> outputs.CLIPOutput:
    """Text (B_text, T) and/or images (B_image, H, W, C) -> outputs.CLIPOutput.

    The logits need both modalities; with one, only its embeds (and pooler output) are set.
    """
    if input_ids is None and pixel_values is None:
      raise ValueError('CLIP needs input_ids, pixel_values or both.')
    text_embeds = text_pooled = image_embeds = image_pooled = None
    if input_ids is not None:
      text_pooled = self.text_model(input_ids, attention_mask, position_ids,
                                    deterministic=deterministic).pooler_output
      text_embeds = l2_normalize(self.text_projection(text_pooled))
    if pixel_values is not None:
      image_pooled = self.vision_model(pixel_values, deterministic=deterministic).pooler_output
      image_embeds = l2_normalize(self.visual_projection(image_pooled))
    logits_per_text = logits_per_image = None
    if text_embeds is not None and image_embeds is not None:
      logits_per_text = self._scale() * (text_embeds @ image_embeds.T)
      logits_per_image = logits_per_text.T
    return outputs.CLIPOutput(
        logits_per_image=logits_per_image, logits_per_text=logits_per_text,
        text_embeds=text_embeds, image_embeds=image_embeds, text_pooler_output=text_pooled,
        image_pooler_output=image_pooled)

  def _scale(self) -> jax.Array:
    # exp of the stored log-temperature; transformers does not clamp it at inference.
    return jnp.exp(jnp.asarray(self.logit_scale, jnp.float32))

  def encode_text(self, input_ids, attention_mask=None, position_ids=None, *,
                  normalize: bool = True, deterministic: bool = True) -> jax.Array:
    """Token ids (B, T) -> (B, E) text embeddings; normalize=False gives transformers'
    get_text_features (projected, not normalised)."""
    pooled = self.text_model(input_ids, attention_mask, position_ids,
                             deterministic=deterministic).pooler_output
    embeds = self.text_projection(pooled)
    return l2_normalize(embeds) if normalize else embeds

  def encode_image(self, pixel_values, *, normalize: bool = True,
                   deterministic: bool = True) -> jax.Array:
    """Images (B, H, W, C) -> (B, E) image embeddings (see encode_text for `normalize`)."""
    pooled = self.vision_model(pixel_values, deterministic=deterministic).pooler_output
    embeds = self.visual_projection(pooled)
    return l2_normalize(embeds) if normalize else embeds

  def zero_shot_logits(self, pixel_values, class_embeds_KxE, *,
                       deterministic: bool = True) -> jax.Array:
    """Images (B, H, W, C) against K class embeddings (K, E) -> scaled logits (B, K).

    class_embeds_KxE come from encode_text on one prompt per class, or are the mean over prompt
    templates of each class's embeddings: they are re-normalised here, as CLIP's recipe does.
    """
    class_embeds_KxE = jnp.asarray(class_embeds_KxE)
    e = self.config.projection_dim
    if class_embeds_KxE.ndim != 2 or class_embeds_KxE.shape[1] != e:
      raise ValueError(f'class_embeds must be (num_classes, {e}) text embeddings from '
                       f'encode_text, got shape {class_embeds_KxE.shape}.')
    image_embeds = self.encode_image(pixel_values, deterministic=deterministic)
    return self._scale() * (image_embeds @ l2_normalize(class_embeds_KxE).T)

  def example_inputs(self, batch_size: int = 1, length: int = 8) -> dict[str, np.ndarray]:
    """Inputs of both modalities, for `init` and shape inference."""
    text, vision = self.config.text_config, self.config.vision_config
    length = min(length, text.max_position_embeddings)
    return {'input_ids': np.zeros((batch_size, length), np.int32),
            'attention_mask': np.ones((batch_size, length), np.int32),
            'pixel_values': np.zeros((batch_size, vision.image_size, vision.image_size,
                                      vision.num_channels), np.float32)}
