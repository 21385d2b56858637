"""CLIP checkpoints (transformers' CLIPModel) <-> ptm_jax.models.clip.

config.json nests `text_config` and `vision_config` dicts, so this family reads its config with
its own `config_from_hf`. Old configs (openai/clip-vit-large-patch14) also carry
`text_config_dict` / `vision_config_dict`; as in transformers, such a dict, completed with the
sub-config's defaults, then replaces every field of `text_config` / `vision_config`. That is how
clip-vit-large-patch14's `text_config.eos_token_id: 2` gives way to the default 49407 (so the
text is pooled at its first EOS, not at its largest id).
"""

import dataclasses

from ptm_jax.hub import convert
from ptm_jax.models import clip

_BLOCK_NAMES = {
    'query': 'self_attn.q_proj', 'key': 'self_attn.k_proj', 'value': 'self_attn.v_proj',
    'out': 'self_attn.out_proj', 'ln_attention': 'layer_norm1', 'fc_in': 'mlp.fc1',
    'fc_out': 'mlp.fc2', 'ln_mlp': 'layer_norm2',
}
_SUB_CONFIGS = {'text_config': clip.CLIPTextConfig, 'vision_config': clip.CLIPVisionConfig}


def _sub_config_from_hf(cls, hf_sub: dict):
  hf_sub = dict(hf_sub)
  for name in ('image_size', 'patch_size'):  # transformers allows [n, n]; we take square sizes.
    value = hf_sub.get(name)
    if isinstance(value, (list, tuple)) and len(set(value)) == 1:
      hf_sub[name] = value[0]
  return convert.config_from_hf(cls, hf_sub)


def config_from_hf(config_cls, hf: dict, **overrides) -> clip.CLIPConfig:
  """CLIPConfig from config.json. overrides: CLIPConfig fields; text_config / vision_config may
  be a sub-config or a dict of its fields to change."""
  subs = {}
  for name, cls in _SUB_CONFIGS.items():
    legacy = hf.get(f'{name}_dict')
    # transformers builds a whole sub-config from *_dict (defaults for what it leaves out) and
    # lets all of it override the nested dict; our defaults are transformers'.
    hf_sub = dict(hf.get(name) or {}) if legacy is None else dict(legacy)
    sub = _sub_config_from_hf(cls, hf_sub)
    change = overrides.pop(name, None)
    if isinstance(change, dict):
      unknown = set(change) - {f.name for f in dataclasses.fields(cls)}
      if unknown:
        raise ValueError(f'Unknown {cls.__name__} fields {sorted(unknown)} in config_overrides'
                         f'[{name!r}]; fields: {[f.name for f in dataclasses.fields(cls)]}.')
      sub = dataclasses.replace(sub, **change)
    elif change is not None:
      sub = change  # CLIPConfig checks its type.
    subs[name] = sub
  return convert.config_from_hf(config_cls, hf, **subs, **overrides)


def extra_hf_config(config: clip.CLIPConfig, head) -> dict:
  # transformers' sub-configs also carry projection_dim, which CLIPTextModelWithProjection and
  # CLIPVisionModelWithProjection read: keep it equal to the joint one.
  return {name: {**convert.config_to_hf(getattr(config, name)),
                 'projection_dim': config.projection_dim} for name in _SUB_CONFIGS}


def _tower_rules(prefix: str, path: convert.Path, num_layers: int) -> list[convert.Rule]:
  out = []
  for i in range(num_layers):
    out += convert.attention_block(f'{prefix}.encoder.layers.{i}', path + (f'layer_{i}',),
                                   _BLOCK_NAMES)
  return out


def rules(config: clip.CLIPConfig, head: str | None) -> list[convert.Rule]:
  del head  # CLIPModel only.
  text, vision = ('params', 'text_model'), ('params', 'vision_model')
  out = [
      convert.embedding('text_model.embeddings.token_embedding', text + ('token_embedding',)),
      convert.embedding('text_model.embeddings.position_embedding',
                        text + ('position_embedding',)),
  ]
  out += _tower_rules('text_model', text, config.text_config.num_layers)
  out += convert.layer_norm('text_model.final_layer_norm', text + ('final_layer_norm',))

  out += [
      convert.same('vision_model.embeddings.class_embedding', vision + ('class_embedding',)),
      convert.conv_kernel('vision_model.embeddings.patch_embedding.weight',
                          vision + ('patch_embedding', 'projection', 'kernel')),
      convert.embedding('vision_model.embeddings.position_embedding',
                        vision + ('position_embedding',)),
  ]
  out += convert.layer_norm('vision_model.pre_layrnorm', vision + ('pre_layernorm',))  # (sic)
  out += _tower_rules('vision_model', vision, config.vision_config.num_layers)
  out += convert.layer_norm('vision_model.post_layernorm', vision + ('post_layernorm',))

  out += convert.linear('visual_projection', ('params', 'visual_projection'), bias=False)
  out += convert.linear('text_projection', ('params', 'text_projection'), bias=False)
  out.append(convert.same('logit_scale', ('params', 'logit_scale')))
  return out


def make_module(config: clip.CLIPConfig, head: str | None = None, **kwargs) -> clip.CLIP:
  if head is not None:
    raise ValueError(f'CLIP has no head {head!r}: load it with head=None (or "auto"); '
                     'zero-shot classification is CLIP.zero_shot_logits.')
  return clip.CLIP(config, **kwargs)


FAMILY = convert.Family(
    name='clip',
    model_types=('clip',),
    config_cls=clip.CLIPConfig,
    architectures={'CLIPModel': None},
    make_module=make_module,
    rules=rules,
    extra_hf_config=extra_hf_config,
    config_from_hf=config_from_hf,
)
