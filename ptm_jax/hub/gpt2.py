"""GPT-2 checkpoints (transformers' GPT2Model, GPT2LMHeadModel) <-> ptm_jax.models.gpt2.

GPT-2's Conv1D layers store their weight as (in, out), already a Dense kernel's layout, and the
attention's query/key/value are one fused c_attn of (D, 3D). GPT2LMHeadModel keys carry the
'transformer.' prefix; the hub's own 'gpt2' checkpoint is a GPT2LMHeadModel without it (the
generic loader accepts both) and without lm_head.weight, which is tied to wte anyway.
"""

from ptm_jax.hub import convert
from ptm_jax.models import gpt2


def _block(key: str, path: convert.Path) -> list[convert.Rule]:
  attention = path + ('attention',)
  fused = lambda leaf: tuple(attention + (n, leaf) for n in ('query', 'key', 'value'))
  rules = [convert.split_last(f'{key}.attn.c_attn.weight', fused('kernel')),
           convert.split_last(f'{key}.attn.c_attn.bias', fused('bias'))]
  for hf, ours in (('attn.c_proj', attention + ('out',)), ('mlp.c_fc', path + ('mlp', 'fc_in')),
                   ('mlp.c_proj', path + ('mlp', 'fc_out'))):
    rules += [convert.same(f'{key}.{hf}.weight', ours + ('kernel',)),
              convert.same(f'{key}.{hf}.bias', ours + ('bias',))]
  rules += convert.layer_norm(f'{key}.ln_1', path + ('ln_attention',))
  rules += convert.layer_norm(f'{key}.ln_2', path + ('ln_mlp',))
  return rules


def rules(config: gpt2.GPT2Config, head: str | None) -> list[convert.Rule]:
  p = 'transformer.' if head is not None else ''  # transformers' base_model_prefix
  base = ('params', 'transformer')
  out = [convert.embedding(f'{p}wte', base + ('wte',)),
         convert.embedding(f'{p}wpe', base + ('wpe',))]
  for i in range(config.num_layers):
    out += _block(f'{p}h.{i}', base + (f'layer_{i}',))
  out += convert.layer_norm(f'{p}ln_f', base + ('ln_f',))
  return out


FAMILY = convert.Family(
    name='gpt2',
    model_types=('gpt2',),
    config_cls=gpt2.GPT2Config,
    architectures={'GPT2Model': None, 'GPT2LMHeadModel': 'lm'},
    make_module=lambda config, **kw: gpt2.GPT2(config, **kw),
    rules=rules,
    prefix='transformer.',
    # The LM head is tied to wte (transformers writes it only when asked to untie).
    tied_keys=(r'^lm_head\.weight$',),
)
