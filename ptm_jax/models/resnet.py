"""ResNet v1.5 (transformers' ResNetModel / ResNetForImageClassification, torchvision's resnet*).

Images are NHWC. The network, for hidden sizes C_s and depths N_s:
  stem      conv 7x7/2 (pad 3) -> BatchNorm -> act -> max-pool 3x3/2 (pad 1)
  stage s   N_s residual blocks; the first one strides by 2 (stage 0 only with
            downsample_in_first_stage) and has a projection shortcut (1x1 conv + BN) whenever
            its channels or resolution change
  basic       block: 3x3 (stride) -> BN -> relu -> 3x3 -> BN, + shortcut, act
  bottleneck  block: 1x1 -> BN -> relu -> 3x3 (stride) -> BN -> relu -> 1x1 -> BN, + shortcut, act;
              the inner width is C_s // 4, the stride sits on the 3x3 conv (v1.5) unless
              downsample_in_bottleneck moves it to the first 1x1 (v1)
  pooler    global average over H, W

Heads, by `ResNet.head`:
  None              (ResNetModel)                   last_hidden_state (B, h, w, C),
                                                    pooler_output (B, C)
  'classification'  (ResNetForImageClassification)  logits (B, K)
transformers' pooler_output is (B, C, 1, 1); ours drops the two unit axes.

Every padding is explicit and symmetric, as torch pads: 'SAME' on a strided conv pads
asymmetrically in XLA and shifts the sampling grid.
"""

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptm_jax.models import labels
from ptm_jax.models import layers
from ptm_jax.models import outputs

HEADS = (None, 'classification')
LAYER_TYPES = ('basic', 'bottleneck')
BN_EPS = 1e-5
BN_MOMENTUM = 0.9      # Flax convention (weight of the old statistics) = torch's momentum 0.1.
BOTTLENECK_REDUCTION = 4


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  num_channels: int = 3
  embedding_size: int = 64
  hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
  depths: tuple[int, ...] = (3, 4, 6, 3)
  layer_type: str = 'bottleneck'
  hidden_act: str = 'relu'
  downsample_in_first_stage: bool = False
  downsample_in_bottleneck: bool = False
  num_labels: int = 1000
  # Class names by id, transformers' label2id and problem_type (see models.labels).
  id2label: tuple[str, ...] | None = labels.field()
  label2id: tuple[tuple[str, int], ...] | None = labels.field()
  problem_type: str | None = labels.field()

  # Every field has transformers' ResNetConfig name already.
  HF_NAMES: ClassVar[dict[str, str]] = {}

  def __post_init__(self):
    labels.normalise(self)
    # config.json gives lists; tuples keep the config hashable.
    object.__setattr__(self, 'hidden_sizes', tuple(int(c) for c in self.hidden_sizes))
    object.__setattr__(self, 'depths', tuple(int(d) for d in self.depths))
    if self.layer_type not in LAYER_TYPES:
      raise ValueError(f'layer_type {self.layer_type!r} is not one of {LAYER_TYPES}.')
    if len(self.hidden_sizes) != len(self.depths) or not self.depths:
      raise ValueError(f'hidden_sizes {self.hidden_sizes} and depths {self.depths} must name the '
                       'same (non-zero) number of stages.')
    if min(self.depths) < 1:
      raise ValueError(f'Every stage needs at least one block; depths are {self.depths}.')
    layers.activation(self.hidden_act)  # Fails early on an unknown name.


def _preset(layer_type, hidden_sizes, depths):
  return ResNetConfig(layer_type=layer_type, hidden_sizes=hidden_sizes, depths=depths)


PRESETS = {
    'resnet18': _preset('basic', (64, 128, 256, 512), (2, 2, 2, 2)),
    'resnet34': _preset('basic', (64, 128, 256, 512), (3, 4, 6, 3)),
    'resnet50': _preset('bottleneck', (256, 512, 1024, 2048), (3, 4, 6, 3)),
    'resnet101': _preset('bottleneck', (256, 512, 1024, 2048), (3, 4, 23, 3)),
    'resnet152': _preset('bottleneck', (256, 512, 1024, 2048), (3, 8, 36, 3)),
}


def block_specs(config: ResNetConfig):
  """(stage, block, in_channels, out_channels, stride, has_shortcut) for every residual block.

  The checkpoint rules (ptm_jax.hub.resnet) read this too, so the module and its conversion agree
  on which blocks own a projection shortcut.
  """
  specs = []
  in_channels = config.embedding_size
  for s, (out_channels, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
    for b in range(depth):
      stride = 1 if b or (s == 0 and not config.downsample_in_first_stage) else 2
      specs.append((s, b, in_channels, out_channels, stride,
                    in_channels != out_channels or stride != 1))
      in_channels = out_channels
  return specs


def conv_layer_count(config: ResNetConfig) -> int:
  return 2 if config.layer_type == 'basic' else 3


def _channel_sum(x_MxC):
  """Sum over the rows, (M, C) -> (C,), as a matrix-vector product.

  The same sum as `x.sum(0)`. XLA's CPU backend emits a reduction over the major axes (with the
  elementwise work fused into it) as one strided loop per channel: 50-100 ms for a (25088, 256)
  operand of ResNet-50's BatchNorm, against a few ms for the dot (README: Benchmarks).
  """
  ones = jnp.ones((x_MxC.shape[0],), x_MxC.dtype)
  return jax.lax.dot_general(ones, x_MxC, (((0,), (0,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize_with_dots(x_MxC, scale_C, bias_C, epsilon: float):
  """Training-mode BatchNorm of (M, C) rows: (y (M, C), batch mean (C,), biased var (C,)).

  Every sum over the rows, forward and backward, is a `_channel_sum` (the backward is written
  out, since autodiff would sum with reductions again).
  """
  return _normalize_fwd(x_MxC, scale_C, bias_C, epsilon)[0]


def _normalize_fwd(x_MxC, scale_C, bias_C, epsilon):
  m = x_MxC.shape[0]
  mean = _channel_sum(x_MxC) / m
  centered = x_MxC - mean
  var = _channel_sum(jnp.square(centered)) / m  # two-pass, like torch
  inv_std = jax.lax.rsqrt(var + epsilon)
  x_hat = centered * inv_std
  return (x_hat * scale_C + bias_C, mean, var), (x_hat, inv_std, scale_C)


def _normalize_bwd(epsilon, saved, cotangents):
  # The gradients of y = x_hat * scale + bias with x_hat = (x - mean) / std over the batch,
  # plus those of the returned mean and variance.
  del epsilon
  x_hat, inv_std, scale = saved
  dy, dmean, dvar = cotangents
  m = x_hat.shape[0]
  dbias = _channel_sum(dy)
  dscale = _channel_sum(dy * x_hat)
  dx = (inv_std * scale) * (dy - (dbias + x_hat * dscale) / m)
  # mean = sum(x) / m; var = sum((x - mean)^2) / m, whose gradient is 2 (x - mean) / m.
  dx = dx + (dmean + (2 * dvar) * (x_hat / inv_std)) / m
  return dx, dscale, dbias


_normalize_with_dots.defvjp(_normalize_fwd, _normalize_bwd)


def _normalize_with_reductions(x_MxC, scale_C, bias_C, epsilon: float):
  """The same as `_normalize_with_dots`, summing with reductions (autodiff's backward)."""
  mean = jnp.mean(x_MxC, 0)
  var = jnp.mean(jnp.square(x_MxC - mean), 0)
  y = (x_MxC - mean) * jax.lax.rsqrt(var + epsilon) * scale_C + bias_C
  return y, mean, var


def normalize_with_batch_stats(x_MxC, scale_C, bias_C, epsilon: float):
  """(y, mean, biased var) of training-mode BatchNorm over (M, C) rows, float32.

  On CPU the sums are dots (`_normalize_with_dots`); elsewhere the reductions are fast and
  autodiff's backward pass is kept.
  """
  return layers.by_platform(
      x_MxC, scale_C, bias_C,
      cpu=lambda *a: _normalize_with_dots(*a, epsilon),
      default=lambda *a: _normalize_with_reductions(*a, epsilon))


class BatchNorm(nn.Module):
  """torch's BatchNorm2d over the last (channel) axis.

  In training it normalises with the biased batch variance and folds the UNBIASED one into the
  running variance, as torch does (flax's nn.BatchNorm folds in the biased one), so fine-tuning
  in train mode tracks the same statistics as PyTorch. Statistics are float32 whatever `dtype`.
  Under jit with a sharded batch the means are global, so no axis_name is needed.
  """
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  scale_init: nn.initializers.Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool = False):
    c = x_BxHxWxC.shape[-1]
    boxed = lambda init: nn.with_logical_partitioning(init, ('conv_out',))
    scale = self.param('scale', boxed(self.scale_init), (c,), self.param_dtype)
    bias = self.param('bias', boxed(nn.initializers.zeros), (c,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', boxed(jnp.zeros), (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', boxed(jnp.ones), (c,), jnp.float32)

    x = x_BxHxWxC.astype(jnp.float32)
    if train:
      n = x.size // c
      if n < 2:
        raise ValueError(f'BatchNorm in training needs more than one value per channel, got input '
                         f'{x_BxHxWxC.shape}: use a larger batch or images, or train=False.')
      if not self.is_mutable_collection('batch_stats'):
        raise ValueError("train=True updates the BatchNorm statistics: call apply(..., "
                         "mutable=['batch_stats']) and keep the returned batch_stats.")
      y, mean, var = normalize_with_batch_stats(
          x.reshape(n, c), jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32),
          self.epsilon)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var * (n / (n - 1))
      return y.reshape(x.shape).astype(self.dtype)
    y = (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    y = y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)
    return y.astype(self.dtype)


class ConvNorm(nn.Module):
  """Bias-free conv with symmetric padding k // 2 -> BatchNorm -> optional activation.

  zero_norm_scale: the BatchNorm scale starts at 0 instead of 1 (ResNet.zero_init_residual).
  """
  features: int
  kernel_size: int
  stride: int = 1
  activation: str | None = 'relu'
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  zero_norm_scale: bool = False

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool = False):
    k, p = self.kernel_size, self.kernel_size // 2
    # torch's kaiming_normal_(mode='fan_out', nonlinearity='relu'); 'normal' is untruncated.
    init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
    x = nn.Conv(self.features, (k, k), strides=(self.stride, self.stride),
                padding=((p, p), (p, p)), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name='conv',
                # ResNet's 1x1 convolutions as dots (faster gradients on CPU).
                conv_general_dilated=layers.conv_general_dilated,
                kernel_init=nn.with_logical_partitioning(
                    init, (None, None, 'conv_in', 'conv_out')))(x_BxHxWxC)
    scale_init = nn.initializers.zeros if self.zero_norm_scale else nn.initializers.ones
    x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, scale_init=scale_init,
                  name='norm')(x, train=train)
    if self.activation is not None:
      x = layers.activation(self.activation)(x)
    return x


class ResidualBlock(nn.Module):
  """A basic or bottleneck block; conv_0.. are its main path, `shortcut` the projection.

  zero_init_residual: the main path's last BatchNorm scale starts at 0, so the block starts as
  act(shortcut(x)).
  """
  config: ResNetConfig
  features: int
  stride: int
  has_shortcut: bool
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool = False):
    cfg = self.config
    last = 'conv_1' if cfg.layer_type == 'basic' else 'conv_2'
    conv = lambda features, k, stride, act, name: ConvNorm(
        features, k, stride, act, dtype=self.dtype, param_dtype=self.param_dtype,
        zero_norm_scale=self.zero_init_residual and name == last, name=name)
    # The inner activations are always ReLU; hidden_act applies after the residual sum only
    # (transformers' layout).
    if cfg.layer_type == 'basic':
      h = conv(self.features, 3, self.stride, 'relu', 'conv_0')(x_BxHxWxC, train=train)
      h = conv(self.features, 3, 1, None, 'conv_1')(h, train=train)
    else:
      width = self.features // BOTTLENECK_REDUCTION
      stride_1x1, stride_3x3 = ((self.stride, 1) if cfg.downsample_in_bottleneck
                                else (1, self.stride))
      h = conv(width, 1, stride_1x1, 'relu', 'conv_0')(x_BxHxWxC, train=train)
      h = conv(width, 3, stride_3x3, 'relu', 'conv_1')(h, train=train)
      h = conv(self.features, 1, 1, None, 'conv_2')(h, train=train)
    residual = x_BxHxWxC
    if self.has_shortcut:
      residual = conv(self.features, 1, self.stride, None, 'shortcut')(x_BxHxWxC, train=train)
    return layers.activation(cfg.hidden_act)(h + residual)


class ResNetBackbone(nn.Module):
  """Stem, stages and global average pooling: (B, H, W, C_in) -> BaseModelOutput."""
  config: ResNetConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, pixels_BxHxWxC, *, train: bool = False):
    cfg = self.config
    if pixels_BxHxWxC.ndim != 4 or pixels_BxHxWxC.shape[-1] != cfg.num_channels:
      hint = (' It looks NCHW: transpose it with x.transpose(0, 2, 3, 1).'
              if pixels_BxHxWxC.ndim == 4 and pixels_BxHxWxC.shape[1] == cfg.num_channels else '')
      raise ValueError(f'pixel_values must be NHWC with {cfg.num_channels} channels, got shape '
                       f'{pixels_BxHxWxC.shape}.{hint}')
    layers.check_float_pixels(pixels_BxHxWxC)
    x = ConvNorm(cfg.embedding_size, 7, 2, cfg.hidden_act, dtype=self.dtype,
                 param_dtype=self.param_dtype, name='stem')(
                     jnp.asarray(pixels_BxHxWxC, self.dtype), train=train)
    # torch's MaxPool2d(3, 2, padding=1): padded cells never win; its gradient goes to the first
    # maximum of each window, as torch's does.
    x = layers.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for s, b, _, out_channels, stride, has_shortcut in block_specs(cfg):
      x = ResidualBlock(cfg, out_channels, stride, has_shortcut, dtype=self.dtype,
                        param_dtype=self.param_dtype, zero_init_residual=self.zero_init_residual,
                        name=f'stage_{s}_block_{b}')(x, train=train)
    pooled_BxC = jnp.mean(x, axis=(1, 2))
    return outputs.BaseModelOutput(last_hidden_state=x, pooler_output=pooled_BxC)


class ResNet(nn.Module):
  """ResNet v1.5 with one of the heads in HEADS; pixel_values are float (B, H, W, C) images.

  BatchNorm uses its running statistics unless train=True, which needs
  apply(..., mutable=['batch_stats']). Variables: params['resnet'] and batch_stats['resnet'],
  plus params['classifier'] for the classification head.

  zero_init_residual (initialisation only, not saved to config.json): the last BatchNorm scale of
  every residual block starts at 0 instead of 1, so each block starts as the identity (before
  its activation) and the network as a shallow one (Goyal et al. 2017, section 5.1; torchvision's
  zero_init_residual). A loaded checkpoint brings its own scales.
  """
  config: ResNetConfig
  head: str | None = None
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, pixel_values, *, train: bool = False):
    if self.head not in HEADS:
      raise ValueError(f'Unknown ResNet head {self.head!r}; choose one of {HEADS}.')
    cfg = self.config
    encoded = ResNetBackbone(cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                             zero_init_residual=self.zero_init_residual,
                             name='resnet')(pixel_values, train=train)
    if self.head is None:
      return encoded
    if cfg.num_labels < 1:
      raise ValueError(f'The classification head needs num_labels >= 1, got {cfg.num_labels}.')
    # torch Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    logits_BxK = layers.dense(
        cfg.num_labels, ('conv_out', 'classes'), name='classifier', dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'))(
            encoded.pooler_output)
    return outputs.ClassifierOutput(logits=logits_BxK,
                                    last_hidden_state=encoded.last_hidden_state)

  def example_inputs(self, batch_size: int = 1, image_size: int = 64) -> dict[str, np.ndarray]:
    """Inputs that `init` and shape inference use (any size works; the model is convolutional)."""
    return {'pixel_values': np.zeros((batch_size, image_size, image_size,
                                      self.config.num_channels), np.float32)}
