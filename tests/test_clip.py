"""CLIP: parity with transformers' CLIPModel in both directions, the encode_* and zero-shot
helpers, config.json reading (nested and legacy sub-configs) and clear errors."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers

import ptm_jax
from ptm_jax.hub import clip as clip_hub
from ptm_jax.models import clip
from tests import parity

VOCAB, LENGTH, IMAGE = 99, 11, 32
FIELDS = ('logits_per_image', 'logits_per_text', 'text_embeds', 'image_embeds')
REAL_EOS, LEGACY_EOS = 97, 2


def small_config(eos_token_id):
  # Deliberately non-default: odd widths, different text and vision widths and heads.
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=37, max_position_embeddings=16,
                       bos_token_id=0, pad_token_id=1, eos_token_id=eos_token_id),
      vision_config=dict(hidden_size=48, image_size=IMAGE, patch_size=8, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=50),
      projection_dim=24, logit_scale_init_value=2.0)


def text_batch(eos_token_id):
  """Ids (3, LENGTH): row 0 unpadded, row 1 right-padded, row 2 left-padded (so the padding
  mask matters, not only the causal one). With a real EOS id each row ends its text with EOS
  and row 1 has a second EOS in its padding, so only the first one is right; the legacy id 2
  pools at the largest id, which random ids place anywhere."""
  ids, mask = parity.token_batch(VOCAB, batch=3, length=LENGTH, first_id=3)
  mask[2] = 1
  mask[2, :3] = 0
  if eos_token_id == REAL_EOS:
    ids[ids == REAL_EOS] = 5
    ids[:, LENGTH - 1] = REAL_EOS
    ids[1, int(mask[1].sum()) - 1] = REAL_EOS
  return ids, mask


def images(n=2, seed=1):
  return np.random.default_rng(seed).normal(size=(n, 3, IMAGE, IMAGE)).astype(np.float32)


def nhwc(pixels_nchw):
  return np.ascontiguousarray(pixels_nchw.transpose(0, 2, 3, 1))


def torch_outputs(model, ids, mask, pixels):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(pixels))


@pytest.fixture(scope='module', params=[REAL_EOS, LEGACY_EOS], ids=['eos97', 'legacy_eos2'])
def case(request, tmp_path_factory):
  eos = request.param
  root = tmp_path_factory.mktemp(f'clip_eos{eos}')
  torch.manual_seed(0)
  reference = parity.perturb(transformers.CLIPModel(small_config(eos)).eval())
  reference.save_pretrained(root / 'hf')
  ids, mask = text_batch(eos)
  pixels = images()
  module, variables = ptm_jax.from_pretrained(str(root / 'hf'))
  return dict(root=root, eos=eos, reference=reference, ids=ids, mask=mask, pixels=pixels,
              expected=torch_outputs(reference, ids, mask, pixels), module=module,
              variables=variables)


def jax_inputs(case):
  return dict(input_ids=case['ids'].astype(np.int32), attention_mask=case['mask'].astype(np.int32),
              pixel_values=nhwc(case['pixels']))


def test_parity_every_field(case):
  module, expected = case['module'], case['expected']
  assert module.config.text_config.eos_token_id == case['eos']
  assert module.config.projection_dim == 24
  ours = module.apply(case['variables'], **jax_inputs(case))
  assert ours.logits_per_image.shape == (2, 3)
  for field in FIELDS:
    assert parity.max_abs_diff(getattr(ours, field), getattr(expected, field)) <= 1e-4, field
  # transformers' CLIPOutput holds the projected pooler outputs; ours are the towers' own.
  reference = case['reference']
  with torch.no_grad():
    text_pooled = reference.text_model(input_ids=torch.tensor(case['ids']),
                                       attention_mask=torch.tensor(case['mask'])).pooler_output
    image_pooled = reference.vision_model(
        pixel_values=torch.tensor(case['pixels'])).pooler_output
  assert parity.max_abs_diff(ours.text_pooler_output, text_pooled) <= 1e-4
  assert parity.max_abs_diff(ours.image_pooler_output, image_pooled) <= 1e-4


def test_batch_tells_the_pooling_rules_apart(case):
  """Guards the parity test itself: the batch must make a wrong pooling rule visible."""
  ids, mask = case['ids'], case['mask']
  last_real = mask.shape[1] - 1 - mask[:, ::-1].argmax(-1)
  if case['eos'] == REAL_EOS:  # first EOS, not the last one (in the padding)
    assert ((ids == REAL_EOS).sum(-1) > 1).any()
  else:  # largest id, not the first 2 nor the last real token
    assert (ids.argmax(-1) != (ids == LEGACY_EOS).argmax(-1)).any()
    assert (ids.argmax(-1) != last_real).any()


def test_encode_and_zero_shot_agree_with_call(case):
  module, variables, expected = case['module'], case['variables'], case['expected']
  inputs = jax_inputs(case)
  ours = module.apply(variables, **inputs)
  text = module.apply(variables, inputs['input_ids'], inputs['attention_mask'],
                      method='encode_text')
  image = module.apply(variables, inputs['pixel_values'], method=module.encode_image)
  assert parity.max_abs_diff(text, ours.text_embeds) <= 1e-6
  assert parity.max_abs_diff(image, ours.image_embeds) <= 1e-6

  # normalize=False is transformers' get_text_features / get_image_features.
  raw_text = module.apply(variables, inputs['input_ids'], inputs['attention_mask'],
                          normalize=False, method='encode_text')
  raw_image = module.apply(variables, inputs['pixel_values'], normalize=False,
                           method='encode_image')
  with torch.no_grad():
    hf_text = case['reference'].get_text_features(
        input_ids=torch.tensor(case['ids']), attention_mask=torch.tensor(case['mask']))
    hf_image = case['reference'].get_image_features(pixel_values=torch.tensor(case['pixels']))
  assert parity.max_abs_diff(raw_text, hf_text.pooler_output) <= 1e-4
  assert parity.max_abs_diff(raw_image, hf_image.pooler_output) <= 1e-4

  # The three texts as class prompts: zero-shot logits are HF's logits_per_image.
  zero_shot = module.apply(variables, inputs['pixel_values'], text, method='zero_shot_logits')
  assert parity.max_abs_diff(zero_shot, expected.logits_per_image) <= 1e-4
  # Unnormalised (or template-averaged) class embeddings are re-normalised.
  again = module.apply(variables, inputs['pixel_values'], 3.0 * raw_text,
                       method='zero_shot_logits')
  assert parity.max_abs_diff(again, zero_shot) <= 1e-5


def test_one_modality(case):
  module, variables, expected = case['module'], case['variables'], case['expected']
  inputs = jax_inputs(case)
  text_only = module.apply(variables, input_ids=inputs['input_ids'],
                           attention_mask=inputs['attention_mask'])
  assert text_only.logits_per_image is None and text_only.image_embeds is None
  assert parity.max_abs_diff(text_only.text_embeds, expected.text_embeds) <= 1e-4
  image_only = module.apply(variables, pixel_values=inputs['pixel_values'])
  assert image_only.logits_per_text is None and image_only.text_embeds is None
  assert parity.max_abs_diff(image_only.image_embeds, expected.image_embeds) <= 1e-4


def test_save_pretrained_loads_in_transformers(case, tmp_path):
  out = ptm_jax.save_pretrained(case['module'], case['variables'], str(tmp_path / 'ours'))
  with open(tmp_path / 'ours' / 'config.json') as f:
    saved = json.load(f)
  assert saved['text_config']['num_hidden_layers'] == 2
  assert saved['text_config']['eos_token_id'] == case['eos']
  assert saved['vision_config']['patch_size'] == 8
  reloaded = transformers.CLIPModel.from_pretrained(out).eval()
  assert reloaded.config.text_config.projection_dim == 24
  again = torch_outputs(reloaded, case['ids'], case['mask'], case['pixels'])
  for field in FIELDS:
    assert parity.max_abs_diff(getattr(again, field).numpy(),
                               getattr(case['expected'], field)) <= 1e-5, field
  # And back into ptm_jax: the same variables.
  _, back = ptm_jax.from_pretrained(out)
  same = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                      back, case['variables'])
  assert max(jax.tree.leaves(same)) == 0.0


def _as_transformers_reads(hf: dict) -> dict:
  """Our sub-config fields, under their config.json names, as transformers' CLIPConfig has them."""
  theirs = transformers.CLIPConfig(**hf)
  out = {}
  for name, cls in (('text_config', clip.CLIPTextConfig), ('vision_config', clip.CLIPVisionConfig)):
    sub = getattr(theirs, name)
    for field in dataclasses.fields(cls):
      value = getattr(sub, cls.HF_NAMES.get(field.name, field.name))
      out[name, field.name] = value[0] if isinstance(value, (list, tuple)) else value
  return out


def test_config_from_hf_nested_and_legacy_dicts():
  def assert_reads_as_transformers(config, hf):
    for (name, field), value in _as_transformers_reads(hf).items():
      assert getattr(getattr(config, name), field) == value, (name, field)

  hf = small_config(LEGACY_EOS).to_dict()
  nested = clip_hub.FAMILY.config(hf)
  assert_reads_as_transformers(nested, hf)
  assert nested.text_config.eos_token_id == LEGACY_EOS and nested.text_config.hidden_size == 40
  # Old configs (openai/clip-vit-large-patch14) repeat sizes in *_dict. transformers completes
  # such a dict with the defaults and lets all of it replace the nested config: fields the dict
  # leaves out (intermediate_size 37, eos_token_id 2) take the defaults (2048, 49407).
  hf['text_config_dict'] = {'num_hidden_layers': 3, 'hidden_size': 40, 'vocab_size': VOCAB}
  hf['vision_config_dict'] = {'image_size': [64, 64], 'hidden_size': 48}
  config = clip_hub.FAMILY.config(hf)
  assert_reads_as_transformers(config, hf)
  assert config.text_config.num_layers == 3 and config.text_config.intermediate_size == 2048
  assert config.text_config.eos_token_id == 49407 and config.vision_config.image_size == 64
  assert config.vision_config.patch_size == 32  # the default, not the nested 8
  # Overrides come last.
  config = clip_hub.FAMILY.config(hf, vision_config={'patch_size': 16}, projection_dim=12)
  assert config.vision_config.patch_size == 16 and config.vision_config.image_size == 64
  assert config.projection_dim == 12
  assert config.logit_scale_init_value == 2.0
  with pytest.raises(ValueError, match='Unknown CLIPVisionConfig fields.*patch'):
    clip_hub.FAMILY.config(hf, vision_config={'patchsize': 16})


def test_presets_have_the_published_sizes():
  import flax.linen as nn
  from ptm_jax import partitioning
  abstract = partitioning.abstract_variables(clip.CLIP(clip.PRESETS['clip-vit-base-patch32']))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract)))
  assert n == 151_277_313  # transformers' CLIPModel for openai/clip-vit-base-patch32


def test_bad_input_gets_a_clear_error(case):
  module, variables = case['module'], case['variables']
  with pytest.raises(ValueError, match='needs input_ids, pixel_values or both'):
    module.apply(variables)
  with pytest.raises(ValueError, match=r'pixel_values must be NHWC.*resize'):
    module.apply(variables, pixel_values=case['pixels'])  # NCHW by mistake
  with pytest.raises(ValueError, match='dtype uint8.*NORMALIZATION'):  # undecoded, unnormalised
    module.apply(variables, pixel_values=np.zeros_like(jax_inputs(case)['pixel_values'], np.uint8))
  with pytest.raises(ValueError, match='truncate the input to 16 tokens'):
    module.apply(variables, input_ids=np.zeros((1, 17), np.int32))
  with pytest.raises(ValueError, match=r'attention_mask has shape \(3, 10\) but input_ids has '
                     r'\(3, 11\)'):
    module.apply(variables, input_ids=case['ids'], attention_mask=case['mask'][:, 1:])
  with pytest.raises(ValueError, match=r'class_embeds must be \(num_classes, 24\)'):
    module.apply(variables, jax_inputs(case)['pixel_values'], np.zeros((3, 5)),
                 method='zero_shot_logits')
  with pytest.raises(ValueError, match='eos_token_id must be one int'):
    clip.CLIPTextConfig(eos_token_id=[2, 49407])
  with pytest.raises(ValueError, match='not divisible by patch_size'):
    clip.CLIPVisionConfig(image_size=30, patch_size=8)
  with pytest.raises(ValueError, match='has no head'):
    ptm_jax.from_pretrained(str(case['root'] / 'hf'), head='classifier')
