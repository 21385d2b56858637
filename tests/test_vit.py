"""ViT: parity with transformers (both directions), google-research .npz loading, resampling."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from PIL import Image

import ptm_jax
from ptm_jax.hub import convert
from ptm_jax.hub import vit as hub_vit
from ptm_jax.models import vit
from tests import parity

HEADS = {None: transformers.ViTModel, 'classification': transformers.ViTForImageClassification}
FIELDS = {None: ('last_hidden_state', 'pooler_output'), 'classification': ('logits',)}
D, HEADS_N, LAYERS, LABELS = 48, 4, 3, 5


def hf_config(**kw):
  # Deliberately non-default: 32px images, 8px patches, odd MLP width, 5 labels.
  return transformers.ViTConfig(
      image_size=32, patch_size=8, hidden_size=D, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS_N, intermediate_size=70, num_channels=3, num_labels=LABELS, **kw)


def our_config(**kw):
  kw = {'hidden_size': D, 'num_layers': LAYERS, 'num_heads': HEADS_N, 'intermediate_size': 70,
        'image_size': 32, 'patch_size': 8, 'num_labels': LABELS, **kw}
  return vit.ViTConfig(**kw)


def images(size=32, batch=2, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def run(module, variables, pixels):
  # One compiled program instead of op-by-op dispatch: much faster on a small CPU.
  return jax.jit(module.apply)(variables, pixel_values=pixels)


def random_variables(module, seed=0):
  """Normal(0, 0.3) numpy variables shaped like module.init's (no slow RNG compile)."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), **module.example_inputs()))
  return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def torch_outputs(model, pixels_nhwc, **kw):
  with torch.no_grad():
    return model(pixel_values=torch.tensor(pixels_nhwc.transpose(0, 3, 1, 2)), **kw)


def hf_model(head, tmp_path, seed=0, **config_kw):
  torch.manual_seed(seed)
  model = parity.perturb(HEADS[head](hf_config(**config_kw)).eval(), seed=seed)
  folder = tmp_path / f'hf_{head}_{seed}'
  model.save_pretrained(folder)
  return model, folder


@pytest.mark.parametrize('head', list(HEADS), ids=str)
def test_parity_both_directions(head, tmp_path):
  reference, folder = hf_model(head, tmp_path)
  pixels = images()
  expected = torch_outputs(reference, pixels)

  module, variables = ptm_jax.from_pretrained(str(folder))
  assert module.head == head
  ours = run(module, variables, pixels)
  for field in FIELDS[head]:
    assert parity.max_abs_diff(getattr(ours, field),
                               getattr(expected, field)) <= parity.TOLERANCE, field
  if head == 'classification':  # the CLS token after the final LN feeds the classifier
    assert ours.last_hidden_state.shape == (2, 17, D)

  ptm_jax.save_pretrained(module, variables, str(tmp_path / 'ours'))
  reloaded = HEADS[head].from_pretrained(tmp_path / 'ours').eval()
  parity.assert_same_weights(reloaded, reference)
  again = torch_outputs(reloaded, pixels)
  for field in FIELDS[head]:
    # The same weights (checked above) and config: the same outputs, bit for bit.
    assert parity.max_abs_diff(getattr(again, field).numpy(), getattr(expected, field)) == 0


def test_vit_model_saved_without_pooler(tmp_path):
  # DINO-style ViTModel checkpoints are saved with add_pooling_layer=False.
  torch.manual_seed(9)
  reference = parity.perturb(transformers.ViTModel(hf_config(), add_pooling_layer=False).eval())
  reference.save_pretrained(tmp_path / 'nopool')
  with pytest.raises(ptm_jax.CheckpointError, match=r'pooler\.dense\.weight'):
    ptm_jax.from_pretrained(str(tmp_path / 'nopool'))
  module, variables = ptm_jax.from_pretrained(str(tmp_path / 'nopool'),
                                              config_overrides={'add_pooling_layer': False})
  pixels = images(seed=9)
  ours = run(module, variables, pixels)
  assert ours.pooler_output is None
  assert parity.max_abs_diff(ours.last_hidden_state,
                             torch_outputs(reference, pixels).last_hidden_state) <= parity.TOLERANCE


# --- google-research .npz ------------------------------------------------------------------------

def write_google_npz(path, tensors, prefix='', pre_logits=None, head=None):
  """Test-side mapping: transformers' saved ViT tensors -> the vision_transformer .npz layout."""
  t = lambda k: tensors[prefix + k]
  dh = D // HEADS_N
  conv_oihw = t('embeddings.patch_embeddings.projection.weight')
  out = {'embedding/kernel': conv_oihw.transpose(2, 3, 1, 0),  # HWIO
         'embedding/bias': t('embeddings.patch_embeddings.projection.bias'),
         'cls': t('embeddings.cls_token'),
         'Transformer/posembed_input/pos_embedding': t('embeddings.position_embeddings'),
         'Transformer/encoder_norm/scale': t('layernorm.weight'),
         'Transformer/encoder_norm/bias': t('layernorm.bias')}
  for i in range(LAYERS):
    hf, g = f'encoder.layer.{i}.', f'Transformer/encoderblock_{i}/'
    att = g + 'MultiHeadDotProductAttention_1/'
    for name in ('query', 'key', 'value'):
      out[att + f'{name}/kernel'] = t(hf + f'attention.attention.{name}.weight').T.reshape(
          D, HEADS_N, dh)
      out[att + f'{name}/bias'] = t(hf + f'attention.attention.{name}.bias').reshape(HEADS_N, dh)
    out[att + 'out/kernel'] = t(hf + 'attention.output.dense.weight').T.reshape(HEADS_N, dh, D)
    out[att + 'out/bias'] = t(hf + 'attention.output.dense.bias')
    for ln, hf_ln in (('LayerNorm_0', 'layernorm_before'), ('LayerNorm_2', 'layernorm_after')):
      out[g + f'{ln}/scale'] = t(hf + f'{hf_ln}.weight')
      out[g + f'{ln}/bias'] = t(hf + f'{hf_ln}.bias')
    for dense, hf_dense in (('Dense_0', 'intermediate.dense'), ('Dense_1', 'output.dense')):
      out[g + f'MlpBlock_3/{dense}/kernel'] = t(hf + f'{hf_dense}.weight').T
      out[g + f'MlpBlock_3/{dense}/bias'] = t(hf + f'{hf_dense}.bias')
  if pre_logits is not None:
    out['pre_logits/kernel'], out['pre_logits/bias'] = pre_logits
  if head is not None:
    out['head/kernel'], out['head/bias'] = head
  np.savez(path, **out)
  return str(path)


def saved_tensors(folder):
  return safetensors.numpy.load_file(str(folder / 'model.safetensors'))


def test_npz_classifier_matches_transformers(tmp_path):
  reference, folder = hf_model('classification', tmp_path, layer_norm_eps=1e-6)
  tensors = saved_tensors(folder)
  head = (tensors['classifier.weight'].T, tensors['classifier.bias'])
  path = write_google_npz(tmp_path / 'cls.npz', tensors, prefix='vit.', head=head)
  pixels = images(seed=1)

  module, variables = hub_vit.from_npz(path, our_config(layer_norm_eps=1e-6))
  ours = run(module, variables, pixels)
  assert parity.max_abs_diff(ours.logits,
                             torch_outputs(reference, pixels).logits) <= parity.TOLERANCE

  # A fresh head for a new label set; everything else as loaded.
  module7, fresh = hub_vit.from_npz(path, our_config(layer_norm_eps=1e-6, num_labels=7),
                                    reinit_head=True)
  assert fresh['params']['classifier']['kernel'].shape == (D, 7)
  np.testing.assert_array_equal(fresh['params']['vit']['final_ln']['scale'],
                                variables['params']['vit']['final_ln']['scale'])
  assert run(module7, fresh, pixels).logits.shape == (2, 7)
  with pytest.raises(ptm_jax.CheckpointError, match=r'5-class head.*num_labels=5.*reinit_head'):
    hub_vit.from_npz(path, our_config(layer_norm_eps=1e-6, num_labels=7))


def test_npz_pre_logits_as_pooler_and_representation(tmp_path):
  reference, folder = hf_model(None, tmp_path, seed=2, layer_norm_eps=1e-6)
  tensors = saved_tensors(folder)
  pre_logits = (tensors['pooler.dense.weight'].T, tensors['pooler.dense.bias'])
  rng = np.random.default_rng(3)
  head = (rng.normal(size=(D, LABELS)).astype(np.float32),
          rng.normal(size=(LABELS,)).astype(np.float32))
  path = write_google_npz(tmp_path / 'pre.npz', tensors, pre_logits=pre_logits, head=head)
  pixels = images(seed=4)
  expected = torch_outputs(reference, pixels)

  # Bare model: the head is dropped and pre_logits (dense + tanh) is transformers' pooler.
  module, variables = hub_vit.from_npz(path, our_config(layer_norm_eps=1e-6), head=None)
  ours = run(module, variables, pixels)
  for field in FIELDS[None]:
    assert parity.max_abs_diff(getattr(ours, field),
                               getattr(expected, field)) <= parity.TOLERANCE, field

  # Classifier: representation_size is taken from the file; logits = head(tanh(pre_logits(CLS))).
  module, variables = hub_vit.from_npz(path, our_config(layer_norm_eps=1e-6))
  assert module.config.representation_size == D
  logits = run(module, variables, pixels).logits
  manual = expected.pooler_output.numpy() @ head[0] + head[1]
  assert parity.max_abs_diff(logits, manual) <= parity.TOLERANCE
  with pytest.raises(ValueError, match='pre-logits'):
    ptm_jax.save_pretrained(module, variables, str(tmp_path / 'no'))


def test_npz_gap_model_round_trip(tmp_path):
  # A 'gap' model (no class token) written in the npz layout from our own tree.
  config = our_config(pool_type='gap', layer_norm_eps=1e-6)
  module = vit.ViT(config, head='classification')
  variables = random_variables(module, seed=1)
  p = jax.tree.map(np.asarray, variables['params'])
  base, dh = p['vit'], D // HEADS_N
  out = {'embedding/kernel': base['patch_embedding']['projection']['kernel'],
         'embedding/bias': base['patch_embedding']['projection']['bias'],
         'Transformer/posembed_input/pos_embedding': base['position_embeddings'],
         'Transformer/encoder_norm/scale': base['final_ln']['scale'],
         'Transformer/encoder_norm/bias': base['final_ln']['bias'],
         'head/kernel': p['classifier']['kernel'], 'head/bias': p['classifier']['bias']}
  for i in range(LAYERS):
    layer, g = base[f'layer_{i}'], f'Transformer/encoderblock_{i}/'
    att = g + 'MultiHeadDotProductAttention_1/'
    for name in ('query', 'key', 'value'):
      out[att + f'{name}/kernel'] = layer['attention'][name]['kernel'].reshape(D, HEADS_N, dh)
      out[att + f'{name}/bias'] = layer['attention'][name]['bias'].reshape(HEADS_N, dh)
    out[att + 'out/kernel'] = layer['attention']['out']['kernel'].reshape(HEADS_N, dh, D)
    out[att + 'out/bias'] = layer['attention']['out']['bias']
    for ln, ours in (('LayerNorm_0', 'ln_attention'), ('LayerNorm_2', 'ln_mlp')):
      out[g + f'{ln}/scale'], out[g + f'{ln}/bias'] = layer[ours]['scale'], layer[ours]['bias']
    for dense, ours in (('Dense_0', 'fc_in'), ('Dense_1', 'fc_out')):
      out[g + f'MlpBlock_3/{dense}/kernel'] = layer['mlp'][ours]['kernel']
      out[g + f'MlpBlock_3/{dense}/bias'] = layer['mlp'][ours]['bias']
  np.savez(tmp_path / 'gap.npz', **out)

  # pool_type is read off the file (no 'cls'), whatever the config said.
  loaded_module, loaded = hub_vit.from_npz(str(tmp_path / 'gap.npz'),
                                           our_config(layer_norm_eps=1e-6))
  assert loaded_module.config.pool_type == 'gap'
  pixels = images(seed=5)
  np.testing.assert_allclose(run(loaded_module, loaded, pixels).logits,
                             run(module, variables, pixels).logits, atol=1e-5)
  # At a larger size the grid (no class row) is resampled.
  big_module, big = hub_vit.from_npz(str(tmp_path / 'gap.npz'),
                                     our_config(layer_norm_eps=1e-6, image_size=48))
  np.testing.assert_allclose(big['params']['vit']['position_embeddings'],
                             vit.resample_position_embeddings(
                                 out['Transformer/posembed_input/pos_embedding'], 6,
                                 has_cls=False), rtol=1e-6, atol=1e-7)
  assert run(big_module, big, images(48)).logits.shape == (2, LABELS)


# --- position-embedding resampling ---------------------------------------------------------------

def test_from_pretrained_at_a_larger_image_size(tmp_path):
  reference, folder = hf_model('classification', tmp_path, seed=6)
  module, variables = ptm_jax.from_pretrained(str(folder), config_overrides={'image_size': 64})
  posemb = np.asarray(variables['params']['vit']['position_embeddings'])
  assert posemb.shape == (1, 1 + 8 * 8, D)
  original = reference.vit.embeddings.position_embeddings.detach().numpy()
  np.testing.assert_array_equal(posemb[:, 0], original[:, 0])  # the class row is kept
  # The 4x4 grid resampled to 8x8 as resample_position_embeddings does (checked against PIL
  # below): the round trip through transformers alone would pass any table, zeros included.
  np.testing.assert_allclose(posemb, vit.resample_position_embeddings(original, 8, has_cls=True),
                             rtol=1e-6, atol=1e-7)
  assert np.abs(posemb[:, 1:]).max() > 0.1
  ours = run(module, variables, images(64))
  assert ours.logits.shape == (2, LABELS)
  assert ours.last_hidden_state.shape == (2, 65, D)

  # Saved at the new size, transformers runs it and agrees.
  ptm_jax.save_pretrained(module, variables, str(tmp_path / 'big'))
  reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path / 'big').eval()
  assert reloaded.config.image_size == 64
  assert parity.max_abs_diff(ours.logits,
                             torch_outputs(reloaded, images(64)).logits) <= parity.TOLERANCE


def test_resample_same_grid_is_identity_and_constants_stay_constant():
  rng = np.random.default_rng(7)
  posemb = rng.normal(size=(1, 17, D)).astype(np.float32)
  np.testing.assert_array_equal(vit.resample_position_embeddings(posemb, 4, has_cls=True), posemb)
  np.testing.assert_array_equal(vit.resample_position_embeddings(posemb[:, 1:], (4, 4),
                                                                 has_cls=False), posemb[:, 1:])
  # Every grid row equal to one vector: any interpolation keeps it, in both directions.
  flat = np.concatenate([posemb[:, :1], np.broadcast_to(posemb[:, 1:2], (1, 16, D))], axis=1)
  for grid in (7, 2, (3, 5)):
    out = vit.resample_position_embeddings(flat, grid, has_cls=True)
    cells = grid * grid if isinstance(grid, int) else grid[0] * grid[1]
    assert out.shape == (1, 1 + cells, D)
    np.testing.assert_array_equal(out[:, 0], posemb[:, 0])
    np.testing.assert_allclose(out[:, 1:], np.broadcast_to(posemb[:, 1:2], (1, cells, D)),
                               atol=1e-5)
  with pytest.raises(ValueError, match='not a square grid'):
    vit.resample_position_embeddings(posemb[:, :15], 5, has_cls=True)


@pytest.mark.parametrize('old_grid, new_grid', [((2, 3), (4, 5)), ((6, 4), (3, 2)),
                                                ((14, 14), (24, 24)), ((4, 4), (2, 6))])
def test_resampled_tables_equal_pil_bicubic_and_torch_bilinear(old_grid, new_grid):
  """A random (not constant), possibly non-square table, up and down: bicubic (the default) is
  PIL's BICUBIC (Keys' cubic, a = -0.5, antialiased when shrinking) on each channel, bilinear is
  torch's interpolate (half-pixel centres, antialias when shrinking); the grid is row-major
  (height, width) and the class row stays."""
  rng = np.random.default_rng(3)
  channels = 3
  posemb = rng.normal(size=(1, 1 + old_grid[0] * old_grid[1], channels)).astype(np.float32)
  grid_HxWxC = posemb[0, 1:].reshape(*old_grid, channels)
  pil = np.stack([np.asarray(Image.fromarray(grid_HxWxC[..., c], mode='F').resize(
      new_grid[::-1], Image.Resampling.BICUBIC)) for c in range(channels)], axis=-1)
  shrinking = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
  bilinear = torch.nn.functional.interpolate(
      torch.tensor(grid_HxWxC).permute(2, 0, 1)[None], size=new_grid, mode='bilinear',
      align_corners=False, antialias=shrinking)[0].permute(1, 2, 0).numpy()
  for method, want_HxWxC in (('bicubic', pil), ('bilinear', bilinear)):
    out = vit.resample_position_embeddings(posemb, new_grid, has_cls=True, old_grid=old_grid,
                                           method=method)
    assert out.shape == (1, 1 + new_grid[0] * new_grid[1], channels)
    np.testing.assert_array_equal(out[:, 0], posemb[:, 0])
    np.testing.assert_allclose(out[0, 1:].reshape(*new_grid, channels), want_HxWxC, atol=1e-5)


# --- errors and pooling --------------------------------------------------------------------------

def test_clear_errors_for_bad_images_and_configs():
  module = vit.ViT(our_config(), head='classification')
  variables = random_variables(module)
  with pytest.raises(ValueError, match=r'36x36 is not divisible by the patch size 8'):
    module.apply(variables, pixel_values=images(36))
  with pytest.raises(ValueError, match=r"40x40 but this ViT was built for image_size 32x32.*"
                     r"config_overrides=\{'image_size': 40\}"):
    module.apply(variables, pixel_values=images(40))
  with pytest.raises(ValueError, match=r'NHWC.*transpose'):
    module.apply(variables, pixel_values=images().transpose(0, 3, 1, 2))
  with pytest.raises(ValueError, match=r'image_size 30x30 is not divisible by patch_size 8'):
    our_config(image_size=30)
  with pytest.raises(ValueError, match='pool_type'):
    our_config(pool_type='max')


def test_gap_pooling():
  config = our_config(pool_type='gap')
  pixels = images(seed=8)
  module = vit.ViT(config, head='classification')
  variables = random_variables(module)
  assert 'cls_token' not in variables['params']['vit']
  assert variables['params']['vit']['position_embeddings'].shape == (1, 16, D)
  out = run(module, variables, pixels)
  assert out.last_hidden_state.shape == (2, 16, D)
  classifier = variables['params']['classifier']
  manual = out.last_hidden_state.mean(axis=1) @ classifier['kernel'] + classifier['bias']
  np.testing.assert_allclose(out.logits, manual, atol=1e-5)

  bare = vit.ViT(config)
  bare_out = run(bare, {'params': {'vit': variables['params']['vit']}}, pixels)
  np.testing.assert_allclose(bare_out.pooler_output, out.last_hidden_state.mean(axis=1),
                             atol=1e-6)
  with pytest.raises(ValueError, match='class token'):
    hub_vit.rules(config, 'classification')


def test_presets_and_hf_names():
  assert set(vit.PRESETS) >= {'vit-ti/16', 'vit-s/32', 'vit-b/16', 'vit-l/14', 'vit-h/14'}
  b16 = vit.PRESETS['vit-b/16']
  assert (b16.hidden_size, b16.num_layers, b16.num_heads, b16.grid) == (768, 12, 12, (14, 14))
  names = convert.config_to_hf(our_config(dropout=0.1))
  assert names['num_hidden_layers'] == LAYERS and names['hidden_dropout_prob'] == 0.1
  assert convert.config_from_hf(vit.ViTConfig, {'image_size': [32, 32], 'patch_size': [8, 8],
                                                'num_hidden_layers': 2}).image_size == 32
