"""Image preprocessing: decoding, channel handling, crops against indices computed here, the
normalisation formula, determinism given the rng, and the errors for bad input."""

import io

import numpy as np
import pytest
from PIL import Image

from ptm_jax.data import image as im


def coordinate_image(height: int, width: int) -> np.ndarray:
  """uint8 (height, width, 3) whose pixel (r, c) holds (r, c, (r + c) % 256): a crop shows where
  it was taken from."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return np.stack([rows, cols, (rows + cols) % 256], axis=-1).astype(np.uint8)


def noise_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# decode and to_channels.

def test_decode_png_bytes_and_path_round_trip(tmp_path):
  rgb = noise_image(7, 5)
  np.testing.assert_array_equal(im.decode(png_bytes(rgb)), rgb)
  path = tmp_path / 'x.png'
  path.write_bytes(png_bytes(rgb))
  np.testing.assert_array_equal(im.decode(path), rgb)
  np.testing.assert_array_equal(im.decode(str(path)), rgb)
  grey = noise_image(4, 6, 1)[:, :, 0]
  decoded = im.decode(png_bytes(grey))
  assert decoded.shape == (4, 6, 1) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded[:, :, 0], grey)


def test_decode_jpeg_is_close_to_the_source():
  smooth = np.broadcast_to(np.linspace(40, 200, 16, dtype=np.uint8)[None, :, None], (16, 16, 3))
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(smooth)).save(buffer, format='JPEG', quality=95)
  decoded = im.decode(buffer.getvalue())
  assert decoded.shape == (16, 16, 3)
  assert np.abs(decoded.astype(int) - smooth).max() <= 8


def test_decode_errors_name_the_input(tmp_path):
  with pytest.raises(ValueError, match=r'cat\.jpg: cannot decode 9 bytes'):
    im.decode(b'not a png', name='cat.jpg')
  with pytest.raises(FileNotFoundError, match='missing.png'):
    im.decode(tmp_path / 'missing.png')
  with pytest.raises(TypeError, match='expected encoded image bytes'):
    im.decode(3.5)


def test_to_channels_grey_and_rgba():
  grey = noise_image(3, 4, 1)
  for given in (grey, grey[:, :, 0]):
    out = im.to_channels(given)
    assert out.shape == (3, 4, 3)
    for c in range(3):
      np.testing.assert_array_equal(out[:, :, c], grey[:, :, 0])
  rgba = noise_image(3, 4, 4)
  np.testing.assert_array_equal(im.to_channels(rgba), rgba[:, :, :3])


def test_to_channels_one_channel_is_luma():
  rgb = noise_image(5, 6)
  expected = np.asarray(Image.fromarray(rgb).convert('L'))  # PIL's ITU-R 601 luma.
  got = im.to_channels(rgb, 1)
  assert got.shape == (5, 6, 1)
  assert np.abs(got[:, :, 0].astype(int) - expected).max() <= 1


def test_to_channels_non_uint8_arrays():
  values = noise_image(2, 3).astype(np.float64)
  np.testing.assert_array_equal(im.to_channels(values), values.astype(np.uint8))
  with pytest.raises(ValueError, match=r'outside \[0, 255\]'):
    im.to_channels(values / 255.0 - 0.5)
  with pytest.raises(ValueError, match=r'outside \[0, 255\]'):
    im.to_channels(values * 2.0)


@pytest.mark.parametrize('shape', [(4, 4, 5), (4, 4, 2), (16,), (2, 4, 4, 3), (0, 4, 3)])
def test_to_channels_rejects_shapes_that_do_not_fit(shape):
  with pytest.raises(ValueError, match=r'photo has shape \(' + ', '.join(map(str, shape))):
    im.to_channels(np.zeros(shape, np.uint8), name='photo')


# ------------------------------------------------------------------------------------------------
# Geometry.

@pytest.mark.parametrize('image_shape,crop', [((10, 12), (4, 6)), ((9, 7), (4, 4)),
                                              ((5, 5), (5, 5)), ((8, 13), (3, 10))])
def test_central_crop_takes_the_centre(image_shape, crop):
  image = coordinate_image(*image_shape)
  out = im.central_crop(image, crop)
  assert out.shape == crop + (3,)
  # The crop's margins differ by at most one pixel on each axis, the extra one at bottom/right.
  top, left = int(out[0, 0, 0]), int(out[0, 0, 1])
  bottom = image_shape[0] - (top + crop[0])
  right = image_shape[1] - (left + crop[1])
  assert bottom - top in (0, 1) and right - left in (0, 1)
  np.testing.assert_array_equal(out, image[top:top + crop[0], left:left + crop[1]])


def test_central_crop_larger_than_image_is_an_error():
  with pytest.raises(ValueError, match=r'central crop of \(6, 6\) from an image of \(5, 8\)'):
    im.central_crop(coordinate_image(5, 8), (6, 6))


def test_resize_and_shorter_side():
  image = noise_image(30, 45)
  # (h, w) is PIL's (w, h); the default is bilinear. PIL antialiases when shrinking.
  pil = lambda size, method: np.asarray(Image.fromarray(image).resize(size, method))
  np.testing.assert_array_equal(im.resize(image, (7, 11)), pil((11, 7), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(im.resize(image, 9, 'bicubic'), pil((9, 9),
                                                                     Image.Resampling.BICUBIC))
  assert im.resize_shorter_side(image, 20).shape == (20, 30, 3)
  assert im.resize_shorter_side(image.transpose(1, 0, 2), 20).shape == (30, 20, 3)
  assert im.resize_shorter_side(noise_image(3, 7, 1), 6).shape == (6, 14, 1)
  # Nearest-neighbour upscaling by an integer factor repeats each pixel.
  small = noise_image(3, 4)
  np.testing.assert_array_equal(im.resize(small, (6, 8), 'nearest'),
                                small.repeat(2, axis=0).repeat(2, axis=1))
  with pytest.raises(ValueError, match=r"Unknown resize method 'area'.*bicubic"):
    im.resize(image, 4, 'area')


def test_random_resized_crop_shape_and_determinism():
  image = noise_image(40, 60)
  first = im.random_resized_crop(image, (12, 16), np.random.default_rng(3))
  again = im.random_resized_crop(image, (12, 16), np.random.default_rng(3))
  other = im.random_resized_crop(image, (12, 16), np.random.default_rng(4))
  assert first.shape == (12, 16, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_random_crop_window_stays_inside_and_follows_scale_and_ratio():
  rng = np.random.default_rng(0)
  height, width = 50, 80
  areas, ratios = [], []
  for _ in range(500):
    top, left, h, w = im.random_crop_window(height, width, rng, scale=(0.2, 0.9),
                                            ratio=(0.5, 2.0))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    areas.append(h * w / (height * width))
    ratios.append(w / h)
  # Rounding to whole pixels moves the fraction and the ratio a little past the bounds.
  assert 0.18 < min(areas) and max(areas) < 0.93 and np.std(areas) > 0.1
  assert 0.45 < min(ratios) and max(ratios) < 2.2


def test_random_resized_crop_takes_its_pixels_from_the_window():
  image = coordinate_image(40, 60)
  window = im.random_crop_window(40, 60, np.random.default_rng(7))
  top, left, h, w = window
  # Nearest resizing to the window's own size is the plain crop.
  out = im.random_resized_crop(image, (h, w), np.random.default_rng(7), method='nearest')
  np.testing.assert_array_equal(out, image[top:top + h, left:left + w])


def test_random_crop_window_falls_back_to_the_clamped_centre():
  # Scale (1, 1) with a ratio range excluding the image's own aspect never fits: fall back.
  top, left, h, w = im.random_crop_window(10, 100, np.random.default_rng(0), scale=(1.0, 1.0),
                                          ratio=(0.5, 2.0))
  assert (h, w) == (10, 20) and (top, left) == (0, 40)
  top, left, h, w = im.random_crop_window(100, 10, np.random.default_rng(0), scale=(1.0, 1.0),
                                          ratio=(0.5, 2.0))
  assert (h, w) == (20, 10) and (top, left) == (40, 0)


def test_random_flip_mirrors_about_half_the_time():
  image = coordinate_image(3, 5)
  rng = np.random.default_rng(0)
  flips = 0
  for _ in range(2000):
    out = im.random_flip(image, rng)
    if np.array_equal(out, image[:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 900 < flips < 1100


def test_augment_strong_is_deterministic_and_changes_the_image():
  image = noise_image(24, 24)
  outs = [im.augment_strong(image, np.random.default_rng(seed)) for seed in (1, 1, 2)]
  for out in outs:
    assert out.shape == image.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], image)
  assert not np.array_equal(outs[0], outs[2])
  grey = im.augment_strong(noise_image(8, 8, 1), np.random.default_rng(0))
  assert grey.shape == (8, 8, 1)
  # No ops, no change.
  np.testing.assert_array_equal(im.augment_strong(image, np.random.default_rng(0), num_ops=0),
                                image)


# ------------------------------------------------------------------------------------------------
# normalize and preprocess.

@pytest.mark.parametrize('name', sorted(im.NORMALIZATION))
def test_normalize_matches_the_formula(name):
  image = noise_image(4, 5)
  mean, std = (np.array(v, np.float64) for v in im.NORMALIZATION[name])
  out = im.normalize(image, name)
  assert out.dtype == np.float32 and out.shape == image.shape
  np.testing.assert_allclose(out, (image / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)
  grey = noise_image(4, 5, 1)
  np.testing.assert_allclose(im.normalize(grey, name), (grey / 255.0 - mean.mean()) / std.mean(),
                             rtol=1e-6, atol=1e-6)


def test_normalization_constants_are_the_published_ones():
  """Against transformers' own copies (image processors of the ResNet/ViT/CLIP checkpoints)."""
  from transformers.utils import constants  # pylint: disable=g-import-not-at-top
  expected = {'imagenet': (constants.IMAGENET_DEFAULT_MEAN, constants.IMAGENET_DEFAULT_STD),
              'clip': (constants.OPENAI_CLIP_MEAN, constants.OPENAI_CLIP_STD),
              'vit': (constants.IMAGENET_STANDARD_MEAN, constants.IMAGENET_STANDARD_STD)}
  for name, (mean, std) in expected.items():
    np.testing.assert_allclose(im.NORMALIZATION[name][0], mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(im.NORMALIZATION[name][1], std, rtol=0, atol=1e-12)


def test_normalize_vit_maps_to_minus_one_one():
  out = im.normalize(np.array([[[0, 255, 0]]], np.uint8), 'vit')
  np.testing.assert_allclose(out, [[[-1.0, 1.0, -1.0]]], atol=1e-7)


def test_normalization_for_family():
  assert [im.normalization_for_family(f) for f in ('resnet', 'vit', 'clip')] == [
      'imagenet', 'vit', 'clip']
  with pytest.raises(ValueError, match="model family 'bert'"):
    im.normalization_for_family('bert')


def test_preprocess_eval_of_a_constant_image_is_the_normalised_constant():
  image = np.broadcast_to(np.array([10, 120, 250], np.uint8), (37, 53, 3))
  out = im.preprocess(image, image_size=16, train=False, rng=None, normalization='clip')
  mean, std = (np.array(v) for v in im.NORMALIZATION['clip'])
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.broadcast_to((np.array([10, 120, 250]) / 255 - mean) / std,
                                                  (16, 16, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('crop_fraction', [0.875, 1.0])
def test_preprocess_eval_matches_a_reference(crop_fraction):
  # Resize the shorter side to round(16 / crop_fraction) with PIL directly, then crop the centre
  # with indices computed here.
  image = noise_image(30, 50)
  shorter = round(16 / crop_fraction)
  long_side = int(shorter * 50 / 30)
  resized = np.asarray(Image.fromarray(image).resize((long_side, shorter),
                                                     Image.Resampling.BICUBIC))
  top, left = (shorter - 16) // 2, (long_side - 16) // 2
  expected = (resized[top:top + 16, left:left + 16] / 255.0 - 0.5) / 0.5
  out = im.preprocess(image, image_size=16, train=False, rng=None, normalization='vit',
                      crop_fraction=crop_fraction, method='bicubic')
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_preprocess_augment_none_resizes_without_crop(tmp_path):
  digits = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
  path = tmp_path / 'digit.png'
  path.write_bytes(png_bytes(digits))
  for train in (True, False):
    out = im.preprocess(path, image_size=16, train=train, rng=None, normalization='none',
                        augment='none', method='nearest')
    expected = digits.repeat(2, axis=0).repeat(2, axis=1)[:, :, None] / 255.0
    np.testing.assert_allclose(out, np.repeat(expected, 3, axis=2), atol=1e-7)


@pytest.mark.parametrize('augment', ['basic', 'strong'])
def test_preprocess_train_shapes_and_determinism(augment):
  image = png_bytes(noise_image(40, 30, 4))
  outs = [im.preprocess(image, image_size=(12, 20), train=True, rng=np.random.default_rng(s),
                        augment=augment) for s in (5, 5, 6)]
  for out in outs:
    assert out.shape == (12, 20, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])
  grey = im.preprocess(noise_image(9, 9), image_size=8, train=True, channels=1,
                       rng=np.random.default_rng(0), augment=augment)
  assert grey.shape == (8, 8, 1)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(normalization='imagenet21k'), ValueError, r"normalization 'imagenet21k'.*'clip'"),
    (dict(augment='mixup'), ValueError, r"augment 'mixup'.*'strong'"),
    (dict(method='area'), ValueError, r"method 'area'"),
    (dict(image_size=0), ValueError, 'image_size must be a positive int'),
    (dict(image_size=(4, -1)), ValueError, 'image_size must be a positive int'),
    (dict(crop_fraction=1.5), ValueError, r'crop_fraction must be in \(0, 1\]'),
    (dict(channels=4), ValueError, 'channels must be 1 or 3'),
    (dict(rng=None), ValueError, 'needs rng='),
    (dict(rng=np.random.RandomState(0)), TypeError, 'np.random.Generator'),
])
def test_preprocess_errors(kwargs, error, match):
  args = dict(image_size=8, train=True, rng=np.random.default_rng(0))
  args.update(kwargs)
  with pytest.raises(error, match=match):
    im.preprocess(noise_image(10, 10), **args)


def test_preprocess_names_the_bad_image():
  with pytest.raises(ValueError, match=r'example 17 has shape \(10, 10, 5\): 5 channels'):
    im.preprocess(noise_image(10, 10, 5), image_size=8, train=False, rng=None, name='example 17')
