"""Per-example image preprocessing in numpy and PIL, run on the host by the input pipeline.

The grain pipeline hands each example to `preprocess` on a CPU worker, so this module uses no
TensorFlow and no JAX: images come in as uint8 arrays (H, W, C) (tfds.data_source has already
decoded them), as encoded bytes, or as file paths (image folders), and go out as float32
(height, width, channels) arrays, normalised the way the pre-trained model was trained.

Training crops follow the Inception / torchvision recipe (random area fraction and log-uniform
aspect ratio, then a horizontal flip); evaluation resizes the shorter side to
image_size / crop_fraction and takes the central crop (crop_fraction 0.875 is the 224-of-256
ImageNet protocol, 1.0 is CLIP's). Resizing is PIL's, which antialiases when shrinking, as
torchvision's PIL path does. All randomness comes from the np.random.Generator passed in, so the
same seed gives the same output.
"""

import io
import math
import os

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

# name -> (mean, std) per channel, in [0, 1] units: normalize computes (x / 255 - mean) / std.
NORMALIZATION = {
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'clip': ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    'vit': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # Google's ViT checkpoints: [0, 255] -> [-1, 1].
    'none': ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # Only scaled to [0, 1].
}
_FAMILY_NORMALIZATION = {'resnet': 'imagenet', 'vit': 'vit', 'clip': 'clip'}
METHODS = {
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,  # CLIP's preprocessing.
    'nearest': Image.Resampling.NEAREST,
}
AUGMENTS = ('none', 'basic', 'strong')
# Grey fill for pixels that rotate / shear / translate bring in from outside the image.
_FILL = 128


def normalization_for_family(family: str) -> str:
  """The NORMALIZATION name a model family's checkpoints were trained with."""
  if family not in _FAMILY_NORMALIZATION:
    raise ValueError(f'No normalization known for model family {family!r}; families: '
                     f'{sorted(_FAMILY_NORMALIZATION)}. Pass normalization= one of '
                     f'{sorted(NORMALIZATION)} instead.')
  return _FAMILY_NORMALIZATION[family]


# ------------------------------------------------------------------------------------------------
# Decoding and channels.

def _pixels(image: np.ndarray, name: str) -> np.ndarray:
  """A numeric (H, W) or (H, W, C) array -> uint8 with a channel axis.

  Arrays that are not uint8 are read on the 0..255 scale and rounded, so a float image in [0, 1]
  must be multiplied by 255 first; values outside [0, 255] are an error rather than clipped.
  """
  if image.dtype.kind not in 'uif':
    raise ValueError(f'{name} has dtype {image.dtype}; expected a numeric pixel array '
                     f'(uint8, or another integer or float dtype with values in [0, 255]).')
  if image.ndim not in (2, 3) or 0 in image.shape:
    raise ValueError(f'{name} has shape {image.shape}; expected a non-empty image of shape '
                     f'(H, W) or (H, W, C).')
  if image.dtype != np.uint8:
    if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 255:
      raise ValueError(f'{name} ({image.dtype}, shape {image.shape}) has values outside '
                       f'[0, 255] (min {image.min()}, max {image.max()}); expected pixel values '
                       f'on the 0..255 scale (multiply a [0, 1] image by 255).')
    image = np.round(image).astype(np.uint8)
  return image[:, :, None] if image.ndim == 2 else image


def _from_pil(pil: Image.Image) -> np.ndarray:
  """A decoded PIL image -> uint8 (H, W, C) with C in 1 (grey), 3 (RGB) or 4 (RGBA)."""
  if pil.mode.startswith('I'):  # How PIL opens 16-bit greyscale PNG/TIFF: scale 65535 -> 255.
    grey = np.asarray(pil, dtype=np.float64) / 257.0
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)[:, :, None]
  if pil.mode == 'P':  # Palette: keep transparency when the palette has some.
    pil = pil.convert('RGBA' if 'transparency' in pil.info else 'RGB')
  elif pil.mode == 'LA':
    pil = pil.convert('L')
  elif pil.mode not in ('L', 'RGB', 'RGBA'):  # '1', CMYK, YCbCr, F, ...
    pil = pil.convert('RGB')
  array = np.asarray(pil, dtype=np.uint8)
  return array[:, :, None] if array.ndim == 2 else array


def decode(data, *, name: str = 'image') -> np.ndarray:
  """Encoded bytes (PNG, JPEG, ...), a file path, a PIL image, or a pixel array -> uint8 (H, W, C).

  C is whatever the source has (1, 3 or 4; a palette image becomes RGB or RGBA, 16-bit grey is
  scaled to 8 bits); `to_channels` fixes it. An array is only checked (numeric, (H, W) or
  (H, W, C), values in [0, 255]) and made uint8.
  `name` (e.g. the file or example id) appears in error messages.
  """
  if isinstance(data, np.ndarray) and data.dtype.kind not in 'SO':
    return _pixels(data, name)
  if isinstance(data, np.ndarray) and data.ndim == 0:  # A bytes scalar from a numpy record.
    data = data.item()
  if isinstance(data, Image.Image):
    return _from_pil(data)
  if isinstance(data, (bytes, bytearray, memoryview)):
    source, what = io.BytesIO(bytes(data)), f'{len(data)} bytes'
  elif isinstance(data, (str, os.PathLike)):
    if not os.path.isfile(data):
      raise FileNotFoundError(f'{name}: no image file at {os.fspath(data)!r}.')
    source, what = data, f'file {os.fspath(data)!r}'
  else:
    raise TypeError(f'{name} is a {type(data).__name__}; expected encoded image bytes, a file '
                    f'path, a PIL image, or a numpy pixel array.')
  try:
    with Image.open(source) as pil:
      pil.load()
      return _from_pil(pil)
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise ValueError(f'{name}: cannot decode {what} as an image ({e}). Expected PNG, JPEG or '
                     f'another format PIL reads.') from e


def to_channels(image: np.ndarray, channels: int = 3, *, name: str = 'image') -> np.ndarray:
  """uint8 (H, W) or (H, W, 1 | 3 | 4) -> uint8 (H, W, channels), channels 1 or 3.

  To 3 channels: grey is repeated, RGBA loses its alpha (no compositing onto a background).
  To 1 channel: RGB (or RGBA without alpha) becomes luma, 0.299 R + 0.587 G + 0.114 B (ITU-R 601,
  as PIL's convert('L')), rounded. Any other shape is a ValueError naming the shape.
  """
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels!r}.')
  image = _pixels(np.asarray(image), name)
  have = image.shape[-1]
  if have not in (1, 3, 4):
    raise ValueError(f'{name} has shape {image.shape}: {have} channels do not fit; expected '
                     f'(H, W), (H, W, 1) greyscale, (H, W, 3) RGB or (H, W, 4) RGBA.')
  if have == 4:
    image, have = image[:, :, :3], 3
  if have == channels:
    return image
  if channels == 3:
    return np.repeat(image, 3, axis=2)
  luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  return np.clip(np.round(luma), 0, 255).astype(np.uint8)[:, :, None]


# ------------------------------------------------------------------------------------------------
# Geometry: resize and crop. Images are uint8 (H, W, C) with C in 1, 3 (or 4); sizes are (h, w).

def _size_pair(size, what: str = 'size') -> tuple[int, int]:
  """An int (square) or an (h, w) pair of positive ints -> (h, w)."""
  try:
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  except TypeError:
    pair = ()
  if (len(pair) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                and s > 0 for s in pair)):
    raise ValueError(f'{what} must be a positive int or an (height, width) pair of positive '
                     f'ints, got {size!r}.')
  return int(pair[0]), int(pair[1])


def _resample(method: str) -> Image.Resampling:
  if method not in METHODS:
    raise ValueError(f'Unknown resize method {method!r}; known: {sorted(METHODS)}.')
  return METHODS[method]


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)


def _from_pil_like(pil: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(pil)
  return array.reshape(array.shape[0], array.shape[1], channels)


def resize(image: np.ndarray, size, method: str = 'bilinear') -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (h, w, C), aspect ratio not kept. `size` is (h, w) or an int."""
  height, width = _size_pair(size)
  resample = _resample(method)
  if image.shape[:2] == (height, width):
    return image
  resized = _to_pil(image).resize((width, height), resample)
  return _from_pil_like(resized, image.shape[-1])


def resize_shorter_side(image: np.ndarray, size: int, method: str = 'bilinear') -> np.ndarray:
  """uint8 (H, W, C) -> the shorter side `size`, the longer side scaled by the same factor.

  The longer side is truncated to an int (as torchvision's Resize(int)), so it never drops below
  `size`.
  """
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
    raise ValueError(f'The shorter side size must be a positive int, got {size!r}.')
  height, width = image.shape[:2]
  if height <= width:
    target = (size, max(size, int(size * width / height)))
  else:
    target = (max(size, int(size * height / width)), size)
  return resize(image, target, method)


def central_crop(image: np.ndarray, size) -> np.ndarray:
  """uint8 (H, W, C) -> the central (h, w, C) window; an odd margin leaves its extra pixel at the
  bottom / right (top = (H - h) // 2)."""
  height, width = _size_pair(size, 'crop size')
  if image.shape[0] < height or image.shape[1] < width:
    raise ValueError(f'Cannot take a central crop of {(height, width)} from an image of '
                     f'{image.shape[:2]}; resize it first (e.g. resize_shorter_side).')
  top = (image.shape[0] - height) // 2
  left = (image.shape[1] - width) // 2
  return image[top:top + height, left:left + width]


def _positive_range(values, what: str) -> tuple[float, float]:
  low, high = (float(v) for v in values)
  if not 0 < low <= high:
    raise ValueError(f'{what} must be (low, high) with 0 < low <= high, got {values!r}.')
  return low, high


def random_crop_window(height: int, width: int, rng: np.random.Generator,
                       scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """The Inception crop window (top, left, crop_height, crop_width) inside a (height, width) image.

  Up to 10 draws of an area fraction uniform in `scale` and an aspect ratio (width / height)
  log-uniform in `ratio`; the first window that fits is placed uniformly at random. When none
  fits, the central window of the whole image with its aspect ratio clamped into `ratio`.
  """
  min_scale, max_scale = _positive_range(scale, 'scale')
  min_ratio, max_ratio = _positive_range(ratio, 'ratio')
  area = height * width
  for _ in range(10):
    target_area = area * rng.uniform(min_scale, max_scale)
    aspect = math.exp(rng.uniform(math.log(min_ratio), math.log(max_ratio)))
    crop_width = round(math.sqrt(target_area * aspect))
    crop_height = round(math.sqrt(target_area / aspect))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return top, left, crop_height, crop_width
  aspect = width / height
  if aspect < min_ratio:  # Too tall: keep the width, cut the height.
    crop_width, crop_height = width, min(height, max(1, round(width / min_ratio)))
  elif aspect > max_ratio:  # Too wide: keep the height, cut the width.
    crop_width, crop_height = min(width, max(1, round(height * max_ratio))), height
  else:
    crop_width, crop_height = width, height
  return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def random_resized_crop(image: np.ndarray, size, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method: str = 'bilinear') -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (h, w, C): a `random_crop_window` crop resized to `size`."""
  top, left, crop_height, crop_width = random_crop_window(image.shape[0], image.shape[1], rng,
                                                          scale, ratio)
  return resize(image[top:top + crop_height, left:left + crop_width], size, method)


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A left-right mirror (a view) with probability 0.5, else the image itself.

  Always draws one number from `rng`, so later draws do not depend on the outcome.
  """
  return image[:, ::-1] if rng.random() < 0.5 else image


# ------------------------------------------------------------------------------------------------
# RandAugment-style strong augmentation. Each op takes (PIL image, level in [0, 1], rng); ops with
# a direction pick its sign (and axis) from rng.

def _signed(level: float, rng: np.random.Generator) -> float:
  return level if rng.random() < 0.5 else -level


def _enhance(enhancer):
  # A factor of 1 leaves the image as is; level 1 moves it by up to 0.9 either way.
  return lambda img, level, rng: enhancer(img).enhance(1.0 + 0.9 * _signed(level, rng))


def _affine(img: Image.Image, matrix) -> Image.Image:
  fill = _FILL if img.mode == 'L' else (_FILL,) * len(img.getbands())
  return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR,
                       fillcolor=fill)


def _shear(img, level, rng):
  shear = 0.3 * _signed(level, rng)
  return _affine(img, (1, shear, 0, 0, 1, 0) if rng.random() < 0.5 else (1, 0, 0, shear, 1, 0))


def _translate(img, level, rng):
  if rng.random() < 0.5:
    return _affine(img, (1, 0, 0.45 * img.width * _signed(level, rng), 0, 1, 0))
  return _affine(img, (1, 0, 0, 0, 1, 0.45 * img.height * _signed(level, rng)))


def _rotate(img, level, rng):
  fill = _FILL if img.mode == 'L' else (_FILL,) * len(img.getbands())
  return img.rotate(30.0 * _signed(level, rng), Image.Resampling.BILINEAR, fillcolor=fill)


_STRONG_OPS = (
    lambda img, level, rng: ImageOps.autocontrast(img),
    lambda img, level, rng: ImageOps.equalize(img),
    _rotate,
    # Inverts pixels at or above the threshold; level 0 (threshold 256) inverts none.
    lambda img, level, rng: ImageOps.solarize(img, 256 - round(256 * level)),
    _enhance(ImageEnhance.Color),
    _enhance(ImageEnhance.Contrast),
    _enhance(ImageEnhance.Brightness),
    _enhance(ImageEnhance.Sharpness),
    lambda img, level, rng: ImageOps.posterize(img, 8 - round(4 * level)),  # Keep 8..4 bits.
    _shear,
    _translate,
)


def augment_strong(image: np.ndarray, rng: np.random.Generator, magnitude: float = 9.0,
                   num_ops: int = 2) -> np.ndarray:
  """RandAugment: `num_ops` ops drawn (with replacement) from autocontrast, equalize, rotate,
  solarize, color, contrast, brightness, sharpness, posterize, shear and translate, each at
  strength magnitude / 10 (10: rotate 30 degrees, shear 0.3, translate 45%, enhance by 0.9).

  uint8 (H, W, C) with C 1 or 3 -> uint8 (H, W, C); deterministic given rng.
  """
  if not 0 <= magnitude <= 10:
    raise ValueError(f'magnitude must be in [0, 10], got {magnitude!r}.')
  if num_ops < 0:
    raise ValueError(f'num_ops must be >= 0, got {num_ops!r}.')
  channels = image.shape[-1]
  if channels not in (1, 3):
    raise ValueError(f'augment_strong takes 1 or 3 channels, got an image of shape {image.shape}; '
                     f'use to_channels first.')
  level = magnitude / 10.0
  pil = _to_pil(np.ascontiguousarray(image))
  for op in rng.integers(0, len(_STRONG_OPS), size=num_ops):
    pil = _STRONG_OPS[op](pil, level, rng)
  return _from_pil_like(pil, channels)


# ------------------------------------------------------------------------------------------------
# Normalisation and the pipeline's entry point.

def _check_normalization(normalization: str) -> None:
  if normalization not in NORMALIZATION:
    raise ValueError(f'Unknown normalization {normalization!r}; known: {sorted(NORMALIZATION)}.')


def normalize(image: np.ndarray, normalization: str = 'imagenet') -> np.ndarray:
  """uint8 (H, W, C) -> float32 (H, W, C): (x / 255 - mean) / std per channel.

  A one-channel image uses the average of the three means and of the three stds.
  """
  _check_normalization(normalization)
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[normalization])
  if image.shape[-1] == 1:
    mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
  elif image.shape[-1] != 3:
    raise ValueError(f'normalize takes 1 or 3 channels, got an image of shape {image.shape}.')
  return (image.astype(np.float32) / np.float32(255) - mean) / std


def preprocess(image, *, image_size, train: bool, rng: np.random.Generator | None,
               normalization: str = 'imagenet', augment: str = 'basic',
               crop_fraction: float = 0.875, channels: int = 3, method: str = 'bilinear',
               name: str = 'image') -> np.ndarray:
  """One example's image (array, bytes or path) -> float32 (height, width, channels).

  image_size: int (square) or (height, width).
  train: with augment 'basic', a `random_resized_crop` then `random_flip`; 'strong' adds
    `augment_strong`; 'none' only resizes to image_size (no crop; for tiny images such as 8x8
    digits).
  eval (train False): resize the shorter side to round(max(image_size) / crop_fraction), then
    take the central crop (crop_fraction 1.0: CLIP's resize-and-centre-crop); with augment
    'none', only resize to image_size.
  rng: required when train and augment != 'none'; the output is a function of its state.
  normalization: a NORMALIZATION name; method: a METHODS name; name: used in error messages.
  """
  size = _size_pair(image_size, 'image_size')
  _check_normalization(normalization)
  if augment not in AUGMENTS:
    raise ValueError(f'Unknown augment {augment!r}; known: {list(AUGMENTS)}.')
  _resample(method)
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'crop_fraction must be in (0, 1], got {crop_fraction!r}.')
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels!r}.')
  if train and augment != 'none':
    if rng is None:
      raise ValueError(f"preprocess(train=True, augment={augment!r}) needs rng= a "
                       f"np.random.Generator (or use augment='none').")
    if not isinstance(rng, np.random.Generator):
      raise TypeError(f'rng must be a np.random.Generator, got {type(rng).__name__}.')

  image = to_channels(decode(image, name=name), channels, name=name)
  if augment == 'none':
    image = resize(image, size, method)
  elif train:
    image = random_flip(random_resized_crop(image, size, rng, method=method), rng)
    if augment == 'strong':
      image = augment_strong(image, rng)
  else:
    shorter = round(max(size) / crop_fraction)
    image = central_crop(resize_shorter_side(image, shorter, method), size)
  return normalize(image, normalization)
