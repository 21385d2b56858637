"""Houlsby adapters, prefix tuning and prompt tuning (ptm_jax.adapt.adapters / prompts): exact at
init (adapters), masks and causality with prefixes/prompts, and each method through the trainer;
EWC's refusal of a loss that one example cannot move (ptm_jax.adapt.ewc)."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ptm_jax.adapt import adapters, ewc, methods, rules
from ptm_jax.models import bert, clip, generate, gpt2, layers, resnet, vit
from tests import adapt_runs

_GPT2 = dataclasses.replace(
    gpt2.PRESETS['gpt2-small'], num_layers=2, hidden_size=32, num_heads=2, vocab_size=50,
    max_position_embeddings=16, dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0)
TINY = {
    'gpt2': lambda **kw: gpt2.GPT2(_GPT2, head='lm', **kw),
    'bert': lambda **kw: bert.Bert(dataclasses.replace(
        bert.PRESETS['bert-tiny'], vocab_size=60, hidden_size=32, num_labels=3, dropout=0.0,
        attention_dropout=0.0), head='sequence_classification', **kw),
    'vit': lambda **kw: vit.ViT(dataclasses.replace(
        vit.PRESETS['vit-ti/16'], image_size=8, patch_size=4, num_layers=2, hidden_size=32,
        num_heads=2, intermediate_size=64, num_labels=5), head='classification', **kw),
}
P = 3  # prefix / prompt length in these tests


def _inputs(family, length=8):
  if family == 'vit':
    return {'pixel_values': jax.random.normal(jax.random.key(1), (2, 8, 8, 3))}
  vocab = 50 if family == 'gpt2' else 60
  return {'input_ids': jax.random.randint(jax.random.key(1), (2, length), 0, vocab)}


def _config(method, **sub):
  return {'method': method, **{k: dict(v) for k, v in sub.items()}}


def _adapted(module, config, inputs):
  """(base params, adapted params with the base weights grafted in and prepared)."""
  base = nn.unbox(module.init(jax.random.key(0), **inputs))['params']
  with methods.applied(config):
    fresh = nn.unbox(module.init(jax.random.key(7), **inputs))['params']
  grafted = rules.unflatten({**rules.flatten(fresh), **rules.flatten(base)})
  return base, methods.prepare(grafted, config, jax.random.key(3))


def _logits(module, params, inputs, config=None, **kwargs):
  with methods.applied(config or {}):
    return module.apply({'params': params}, **inputs, **kwargs).logits


def _edit(params, fn):
  """params with fn(path, leaf) -> new leaf (or None: unchanged) applied to every leaf."""
  flat = rules.flatten(params)
  for path, leaf in list(flat.items()):
    new = fn(path, leaf)
    if new is not None:
      flat[path] = new
  return rules.unflatten(flat)


# ------------------------------------------------------------------------------------------------
# Adapters.


@pytest.mark.parametrize('family', ['bert', 'gpt2'])   # post-LN and pre-LN (ViT: the trainer test)
def test_adapters_at_init_change_no_output_and_then_do(family):
  module, inputs = TINY[family](), _inputs(family)
  config = _config('adapter', adapter={'bottleneck': 4})
  base, adapted = _adapted(module, config, inputs)
  added = {p: v.shape for p, v in rules.flatten(adapted).items() if 'adapter_' in p}
  # Two sites per block (attention/out, mlp/fc_out), four leaves each, in that Dense's scope.
  assert len(added) == 2 * 2 * 4
  assert all(re.search(r'/layer_[01]/(attention/out|mlp/fc_out)/adapter_[a-z_]+$', p)
             for p in added), sorted(added)
  assert {s for p, s in added.items() if p.endswith('adapter_down_kernel')} == {(32, 4)}
  assert {s for p, s in added.items() if p.endswith('adapter_up_kernel')} == {(4, 32)}
  reference = _logits(module, base, inputs)
  np.testing.assert_array_equal(_logits(module, adapted, inputs, config), reference)

  trained = _edit(adapted, lambda p, v: 0.5 * jax.random.normal(jax.random.key(len(p)), v.shape)
                  if '/adapter_' in p else None)
  assert float(jnp.abs(_logits(module, trained, inputs, config) - reference).max()) > 1e-3


def test_adapter_init_is_houlsby_with_a_zero_up_projection():
  module, inputs = TINY['gpt2'](), _inputs('gpt2')
  _, adapted = _adapted(module, _config('adapter'), inputs)   # default bottleneck 64, std 1e-3
  flat = rules.flatten(adapted)
  down = np.concatenate([np.ravel(v) for p, v in flat.items() if p.endswith('down_kernel')])
  assert abs(down.std() - 1e-3) < 1e-4 and abs(down.mean()) < 1e-4
  assert all(not np.any(v) for p, v in flat.items()
             if p.endswith(('up_kernel', 'up_bias', 'down_bias')))
  assert flat['transformer/layer_0/mlp/fc_out/adapter_down_kernel'].shape == (32, 64)


def test_adapter_init_std_of_zero_is_refused():
  """init_std 0 is a fixed point: W_down = W_up = 0 makes the bottleneck gelu(0) = 0, so neither
  kernel ever gets a gradient (only adapter_up_bias would train)."""
  with pytest.raises(ValueError, match='init_std must be > 0'):
    adapters.Adapter(init_std=0.0)
  with pytest.raises(ValueError, match='init_std must be > 0'):
    adapters.Adapter.from_config(_config('adapter', adapter={'init_std': -1e-3}))
  assert adapters.Adapter(init_std=1e-6).init_std == 1e-6


def test_adapters_in_a_scanned_stack_are_stacked_and_exact():
  module = TINY['gpt2'](layer_stack=layers.LayerStack(scan=True))
  inputs = _inputs('gpt2')
  config = _config('adapter', adapter={'bottleneck': 4})
  base, adapted = _adapted(module, config, inputs)
  flat = rules.flatten(adapted)
  assert flat['transformer/layers/attention/out/adapter_up_kernel'].shape == (2, 4, 32)
  np.testing.assert_array_equal(_logits(module, adapted, inputs, config),
                                _logits(module, base, inputs))


def test_adapters_refuse_a_model_without_transformer_blocks():
  cfg = dataclasses.replace(resnet.PRESETS['resnet18'], hidden_sizes=(8,), depths=(1,),
                            embedding_size=8, num_labels=2)
  module = resnet.ResNet(cfg, head='classification')
  with methods.applied(_config('adapter')), pytest.raises(ValueError, match='no attention/out'):
    module.init(jax.random.key(0), **module.example_inputs(image_size=16))
  with methods.applied(_config('prefix')), pytest.raises(ValueError, match='ResNet has none'):
    module.init(jax.random.key(0), **module.example_inputs(image_size=16))


# ------------------------------------------------------------------------------------------------
# Prefix tuning.


def _attention_reference(x_BxTxD, params, prefix_k_PxD, prefix_v_PxD, mask_BxS, causal, heads):
  """Numpy attention over [prefix; keys], written out from the definition."""
  dense = lambda name, y: y @ np.asarray(params[name]['kernel']) + np.asarray(params[name]['bias'])
  x = np.asarray(x_BxTxD, np.float64)
  b, t, d = x.shape
  h = d // heads
  split = lambda y: y.reshape(*y.shape[:-1], heads, h)
  q, k, v = split(dense('query', x)), split(dense('key', x)), split(dense('value', x))
  pk = np.broadcast_to(split(np.asarray(prefix_k_PxD)), (b, *split(np.asarray(prefix_k_PxD)).shape))
  pv = np.broadcast_to(split(np.asarray(prefix_v_PxD)), pk.shape)
  k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
  logits = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(h)
  p = pk.shape[1]
  visible = np.ones((b, 1, t, p + t), bool)
  if causal:
    visible[..., p:] &= np.tril(np.ones((t, t), bool))
  if mask_BxS is not None:
    visible[..., p:] &= np.asarray(mask_BxS, bool)[:, None, None, :]
  logits = np.where(visible, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('bnts,bsnh->btnh', probs, v).reshape(b, t, d)
  return dense('out', out)


@pytest.mark.parametrize('causal', [False, True])
def test_prefix_attention_equals_the_definition(causal):
  """One attention layer with per-layer prefixes (the MLP-free form): every query sees every
  prefix, keys <= i in a causal layer, and padded keys are ignored."""
  attention = layers.MultiHeadAttention(num_heads=2, head_dim=8)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
  params = nn.unbox(attention.init(jax.random.key(1), x))['params']
  params['prefix_key'] = 2.0 * jax.random.normal(jax.random.key(2), (P, 16))
  params['prefix_value'] = jax.random.normal(jax.random.key(3), (P, 16))
  with methods.applied(_config('prefix')):
    out = attention.apply({'params': params}, x, layers.padding_mask(mask), causal=causal)
  expected = _attention_reference(x, params, params['prefix_key'], params['prefix_value'], mask,
                                  causal, heads=2)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_prefix_mlp_shapes_and_its_drop_keep_the_outputs():
  module, inputs = TINY['gpt2'](), _inputs('gpt2')
  config = _config('prefix', prefix={'length': P, 'hidden': 16})
  base, adapted = _adapted(module, config, inputs)
  added = {p: v.shape for p, v in rules.flatten(adapted).items() if p not in rules.flatten(base)}
  assert added == {'prefix_encoder/embedding': (P, 32), 'prefix_encoder/hidden/kernel': (32, 16),
                   'prefix_encoder/hidden/bias': (16,), 'prefix_encoder/out/kernel': (16, 128),
                   'prefix_encoder/out/bias': (128,)}   # 128 = 2 layers x (key, value) x 32
  out = _logits(module, adapted, inputs, config)
  assert out.shape == (2, 8, 50)
  assert float(jnp.abs(out - _logits(module, base, inputs)).max()) > 1e-3

  plain = methods.merge(adapted, config)   # the MLP dropped, prefixes per layer
  flat = rules.flatten(plain)
  assert not any('prefix_encoder' in p for p in flat)
  assert flat['transformer/layer_1/attention/prefix_value'].shape == (P, 32)
  np.testing.assert_allclose(_logits(module, plain, inputs, config), out, atol=1e-6)
  # The per-layer form runs in a scanned stack too.
  scanned = TINY['gpt2'](layer_stack=layers.LayerStack(scan=True))
  np.testing.assert_allclose(_logits(scanned, layers.stack_layers(plain), inputs, config), out,
                             atol=1e-6)
  # Training through the MLP needs the looped stack, and says so.
  with methods.applied(config), pytest.raises(ValueError, match='scan_layers=False'):
    scanned.init(jax.random.key(0), **inputs)


def test_prefix_is_seen_by_every_position_and_keeps_causality_and_padding():
  module, inputs = TINY['gpt2'](), _inputs('gpt2')
  config = _config('prefix', prefix={'length': P, 'hidden': 16})
  _, adapted = _adapted(module, config, inputs)
  plain = methods.merge(adapted, config)
  # Zero keys; two prefix sets that differ only in the LAST prefix's value: position 0 of a causal
  # model tells them apart only if it sees prefix P-1 (a causal mask over [prefix; tokens] would
  # hide it).
  zero_keys = lambda value: _edit(plain, lambda p, v: jnp.zeros_like(v) if p.endswith(
      'prefix_key') else (jnp.zeros_like(v).at[-1].set(value) if p.endswith('prefix_value')
                          else None))
  changed = jnp.abs(_logits(module, zero_keys(5.0), inputs, config)
                    - _logits(module, zero_keys(0.0), inputs, config)).max(axis=-1)
  assert bool(jnp.all(changed > 1e-3)), changed
  # Causality: position i does not depend on tokens after i.
  ids = inputs['input_ids']
  later = ids.at[:, 5:].set((ids[:, 5:] + 1) % 50)
  a = _logits(module, adapted, {'input_ids': ids}, config)
  b = _logits(module, adapted, {'input_ids': later}, config)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-4
  # Padding: padded keys stay ignored, whatever their tokens (BERT, bidirectional).
  module, inputs = TINY['bert'](), _inputs('bert')
  _, adapted = _adapted(module, config, inputs)
  mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
  other = inputs['input_ids'].at[1, 5:].set(7)
  np.testing.assert_allclose(
      _logits(module, adapted, {'input_ids': other}, config, attention_mask=mask),
      _logits(module, adapted, inputs, config, attention_mask=mask), atol=1e-6)


def test_prefix_with_the_kv_cache_equals_the_full_forward():
  module, inputs = TINY['gpt2'](), _inputs('gpt2')
  config = _config('prefix', prefix={'length': P, 'hidden': 16})
  _, adapted = _adapted(module, config, inputs)
  ids = inputs['input_ids']
  full = _logits(module, adapted, inputs, config)
  with methods.applied(config):
    cache = generate.init_cache(module, 2, 8)
    mask = jnp.ones((2, 8), jnp.int32)
    logits = []
    for start, stop in ((0, 6), (6, 7), (7, 8)):   # a prefill, then one token at a time
      out, state = module.apply({'params': adapted, 'cache': cache}, ids[:, start:stop],
                                attention_mask=mask, position_ids=jnp.arange(start, stop)[None],
                                decode=True, mutable=['cache'])
      cache = state['cache']
      logits.append(out.logits)
  np.testing.assert_allclose(jnp.concatenate(logits, axis=1), full, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Prompt tuning.


@pytest.mark.parametrize('family', sorted(TINY))
def test_prompts_keep_output_shapes_and_reach_every_position(family):
  module, inputs = TINY[family](), _inputs(family)
  config = _config('prompt', prompt={'length': P, 'init': 'uniform'})
  base, adapted = _adapted(module, config, inputs)
  added = {p: v.shape for p, v in rules.flatten(adapted).items() if p not in rules.flatten(base)}
  assert list(added.values()) == [(P, 32)] and list(added)[0].endswith('layer_0/prompt')
  prompt = rules.flatten(adapted)[list(added)[0]]
  assert float(prompt.min()) >= -0.5 and float(prompt.max()) <= 0.5 and float(prompt.std()) > 0.2
  reference = module.apply({'params': base}, **inputs)
  with methods.applied(config):
    out = module.apply({'params': adapted}, **inputs)
  # (B, T, V) for the LM, (B, K) for the classifiers; hidden states (B, T, D): prompts dropped.
  assert out.logits.shape == reference.logits.shape
  assert out.last_hidden_state.shape == reference.last_hidden_state.shape
  changed = jnp.abs(out.last_hidden_state - reference.last_hidden_state).max(axis=-1)
  assert bool(jnp.all(changed > 1e-3)), changed   # every position (GPT-2: position 0 too)


def test_prompts_keep_causality_and_padding():
  module, inputs = TINY['gpt2'](), _inputs('gpt2')
  config = _config('prompt', prompt={'length': P, 'init': 'uniform'})
  _, adapted = _adapted(module, config, inputs)
  ids = inputs['input_ids']
  later = ids.at[:, 5:].set((ids[:, 5:] + 1) % 50)
  a = _logits(module, adapted, {'input_ids': ids}, config)
  b = _logits(module, adapted, {'input_ids': later}, config)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  # A causal LM row padded on the right: its real positions do not see the padding.
  mask = jnp.array([[1] * 8, [1] * 6 + [0] * 2])
  padding_changed = ids.at[:, 6:].set((ids[:, 6:] + 1) % 50)
  np.testing.assert_allclose(
      _logits(module, adapted, {'input_ids': padding_changed}, config, attention_mask=mask)[1, :6],
      _logits(module, adapted, {'input_ids': ids}, config, attention_mask=mask)[1, :6], atol=1e-6)

  module, inputs = TINY['bert'](), _inputs('bert')
  _, adapted = _adapted(module, config, inputs)
  mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
  other = inputs['input_ids'].at[1, 5:].set(7)
  np.testing.assert_allclose(
      _logits(module, adapted, {'input_ids': other}, config, attention_mask=mask),
      _logits(module, adapted, inputs, config, attention_mask=mask), atol=1e-6)


@dataclasses.dataclass(frozen=True)
class _StackConfig:
  num_layers: int = 2
  hidden_size: int = 16


class _Stack(nn.Module):
  """Two pre-LN blocks under a config with num_layers, taking any attention mask: the smallest
  model that prompts attach to."""
  config: _StackConfig = _StackConfig()

  @nn.compact
  def __call__(self, x_BxTxD, mask):
    return layers.transformer_stack(
        x_BxTxD, mask, num_layers=self.config.num_layers, num_heads=2, head_dim=8, mlp_dim=32,
        activation='gelu', layer_norm_eps=1e-5, norm_first=True,
        init_std=0.3)   # far from uniform attention, so that a leak shows


def test_prompts_under_a_per_query_mask_see_only_what_every_query_sees():
  """A (B, 1, T, S) mask: the prompts' query rows must not see a key that some query may not
  (padding, a later token), or the next block's tokens read it from the prompts."""
  config = _config('prompt', prompt={'length': P, 'init': 'uniform'})
  module = _Stack()
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  keys_only = layers.padding_mask(jnp.array([[1] * 6, [1] * 4 + [0] * 2]))   # (B, 1, 1, S)
  per_query = jnp.broadcast_to(keys_only, (2, 1, 6, 6))
  causal = jnp.logical_and(per_query, jnp.tril(jnp.ones((6, 6), bool)))
  with methods.applied(config):
    params = nn.unbox(module.init(jax.random.key(1), x, keys_only))['params']
    run = jax.jit(lambda x, mask: module.apply({'params': params}, x, mask))
    expected = run(x, keys_only)
    out = run(x, per_query)
    noise = jax.random.normal(jax.random.key(2), x.shape)   # not a constant: LayerNorm removes it
    padding_changed = run(x.at[1, 4:].add(noise[1, 4:]), per_query)
    later_changed = run(x.at[:, 3:].add(noise[:, 3:]), causal), run(x, causal)
  np.testing.assert_allclose(out, expected, atol=1e-6)   # the same mask, broadcast
  np.testing.assert_allclose(padding_changed[1, :4], out[1, :4], atol=1e-6)
  np.testing.assert_allclose(later_changed[0][:, :3], later_changed[1][:, :3], atol=1e-6)
  assert float(jnp.abs(later_changed[0][:, 3:] - later_changed[1][:, 3:]).max()) > 1e-3


def _clip_inputs():
  cfg = clip.PRESETS['clip-tiny'].text_config
  body = jax.random.randint(jax.random.key(1), (2, 6), 2, 1000)
  # Row 0 ends in EOS at position 6, row 1 at position 4 and then pads.
  ids = jnp.concatenate([body, jnp.full((2, 2), cfg.pad_token_id)], axis=1)
  ids = ids.at[0, 6].set(cfg.eos_token_id).at[1, 4].set(cfg.eos_token_id)
  ids = ids.at[1, 5:].set(cfg.pad_token_id)
  mask = jnp.array([[1] * 7 + [0], [1] * 5 + [0] * 3])
  pixels = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  return {'input_ids': ids, 'attention_mask': mask, 'pixel_values': pixels}


@pytest.mark.parametrize('method', ['prompt', 'prefix'])
def test_prompts_and_prefixes_on_both_clip_towers(method):
  """Each tower gets its own prompts (or prefix MLP); the outputs keep their shapes, both
  embeddings move, and the text tower still pools at its EOS: tokens after it, padded, change
  nothing."""
  module, inputs = clip.CLIP(clip.PRESETS['clip-tiny']), _clip_inputs()
  config = _config(method, **({'prompt': {'length': P, 'init': 'uniform'}} if method == 'prompt'
                              else {'prefix': {'length': P, 'hidden': 16}}))
  base, adapted = _adapted(module, config, inputs)
  added = sorted(p for p in rules.flatten(adapted) if p not in rules.flatten(base))
  towers = {p.split('/')[0] for p in added}
  assert towers == {'text_model', 'vision_model'}, added
  if method == 'prompt':
    assert [p.split('/')[-1] for p in added] == ['prompt', 'prompt']
    assert all('layer_0' in p for p in added)
  else:
    assert all('prefix_encoder' in p for p in added) and len(added) == 10  # 5 leaves a tower
  reference = module.apply({'params': base}, **inputs)
  with methods.applied(config):
    out = module.apply({'params': adapted}, **inputs)
    after_eos = inputs['input_ids'].at[1, 5:].set(7)
    padded_changed = module.apply({'params': adapted}, **{**inputs, 'input_ids': after_eos})
  assert out.logits_per_image.shape == reference.logits_per_image.shape == (2, 2)
  for name in ('text_embeds', 'image_embeds'):
    assert float(jnp.abs(getattr(out, name) - getattr(reference, name)).min(axis=-1).max()) \
        > 0 and float(jnp.abs(getattr(out, name) - getattr(reference, name)).max()) > 1e-3
  np.testing.assert_allclose(padded_changed.text_embeds, out.text_embeds, atol=1e-6)
  np.testing.assert_allclose(padded_changed.image_embeds, out.image_embeds, atol=0)


def test_prompts_on_a_gap_vit_average_the_patches_only():
  """pool_type 'gap': the pooled output is the mean over the patch tokens, the prompts dropped
  before it (so it equals the mean of the returned hidden states, which keep T = patches)."""
  module = vit.ViT(dataclasses.replace(TINY['vit']().config, pool_type='gap'), head=None)
  inputs = _inputs('vit')
  config = _config('prompt', prompt={'length': P, 'init': 'uniform'})
  base, adapted = _adapted(module, config, inputs)
  added = {p: v.shape for p, v in rules.flatten(adapted).items() if p not in rules.flatten(base)}
  assert list(added.values()) == [(P, 32)] and list(added)[0].endswith('layer_0/prompt'), added
  reference = module.apply({'params': base}, **inputs)
  with methods.applied(config):
    out = module.apply({'params': adapted}, **inputs)
  assert out.last_hidden_state.shape == reference.last_hidden_state.shape == (2, 4, 32)
  np.testing.assert_allclose(out.pooler_output, out.last_hidden_state.mean(axis=1), atol=1e-6)
  assert float(jnp.abs(out.pooler_output - reference.pooler_output).max()) > 1e-3


def test_vocab_init_takes_rows_of_the_loaded_word_embeddings():
  module, inputs = TINY['gpt2'](), _inputs('gpt2')
  config = _config('prompt', prompt={'length': P, 'init': 'vocab'})
  base, adapted = _adapted(module, config, inputs)
  table = np.asarray(rules.flatten(base)['transformer/wte/embedding'])
  prompt = np.asarray(rules.flatten(adapted)['transformer/layer_0/prompt'])
  rows = [int(np.flatnonzero((table == row).all(axis=1))[0]) for row in prompt]
  assert len(set(rows)) == P   # distinct vocabulary rows
  with pytest.raises(ValueError, match="prompt.init='uniform'"):
    _adapted(TINY['vit'](), config, _inputs('vit'))  # no vocabulary anywhere
  with pytest.raises(ValueError, match='pass rng'):
    methods.prepare(adapted, config)
  # CLIP: the text tower's prompts are its vocabulary's rows; the image tower's keep their draw.
  clip_module = clip.CLIP(clip.PRESETS['clip-tiny'])
  base, adapted = _adapted(clip_module, config, _clip_inputs())
  flat, uniform = rules.flatten(adapted), _adapted(clip_module, _config(
      'prompt', prompt={'length': P, 'init': 'uniform'}), _clip_inputs())[1]
  table = np.asarray(rules.flatten(base)['text_model/token_embedding/embedding'])
  text_prompt = np.asarray(flat['text_model/layer_0/prompt'])
  assert all((table == row).all(axis=1).any() for row in text_prompt)
  np.testing.assert_array_equal(flat['vision_model/layer_0/prompt'],
                                rules.flatten(uniform)['vision_model/layer_0/prompt'])


def test_prompts_refuse_a_scanned_stack_and_the_kv_cache():
  config = _config('prompt', prompt={'length': P, 'init': 'uniform'})
  scanned = TINY['gpt2'](layer_stack=layers.LayerStack(scan=True))
  with methods.applied(config), pytest.raises(ValueError, match='scan_layers=False'):
    scanned.init(jax.random.key(0), **_inputs('gpt2'))
  with methods.applied(config), pytest.raises(ValueError, match='decode=True'):
    generate.init_cache(TINY['gpt2'](), 2, 8)


# ------------------------------------------------------------------------------------------------
# Through the trainer: the digits ViT (runlocal), a few steps, a checkpoint after every step.

STEPS = 2   # W_down moves from the second update on (W_up = 0 before the first)


def _train(tmp_path, **adapt):
  # No weight decay: a leaf changes only through its gradient.
  summary, checkpoints = adapt_runs.digits_run(tmp_path, STEPS, weight_decay=0.0, **adapt)
  return summary, {step: adapt_runs.trained_params(checkpoints, step) for step in (1, STEPS)}


_EXPECTED_TRAINABLE = {
    # 2 blocks x (attention/out, mlp/fc_out) x 4 adapter leaves, every LayerNorm, the classifier.
    'adapter': lambda p: ('/adapter_' in p or p.split('/')[-2] in ('ln_attention', 'ln_mlp',
                                                                   'final_ln')
                          or p.startswith('classifier/')),
    'prefix': lambda p: p.startswith(('prefix_encoder/', 'classifier/')),
    'prompt': lambda p: p in ('vit/layer_0/prompt', 'classifier/kernel', 'classifier/bias'),
}
_COUNTS = {'adapter': 16 + 2 * 4 + 2 + 2, 'prefix': 5 + 2, 'prompt': 3}


@pytest.mark.parametrize('method', ['adapter', 'prefix', 'prompt'])
def test_the_trainer_trains_exactly_the_added_parameters(tmp_path, method):
  """The train state (and checkpoint) holds exactly the method's leaves, every one of which
  moves; every other leaf is a frozen jit argument that the step cannot change."""
  adapt = {'method': method, 'adapter': {'bottleneck': 8}, 'prefix': {'length': 4, 'hidden': 16},
           'prompt': {'length': 4, 'init': 'uniform'}}
  summary, by_step = _train(tmp_path, **adapt)
  trained = by_step[STEPS]
  assert len(trained) == _COUNTS[method] and all(map(_EXPECTED_TRAINABLE[method], trained))
  unchanged = [p for p in trained if np.array_equal(trained[p], by_step[1][p])]
  assert not unchanged, unchanged
  assert summary['adapt_method'] == method
  assert summary['trainable_params'] == sum(v.size for v in trained.values())
  assert summary['trainable_params'] < summary['total_params']


# ------------------------------------------------------------------------------------------------
# EWC.


def test_ewc_refuses_a_loss_that_one_example_cannot_move():
  """A contrastive loss scores each example against the others of its batch: alone, an example
  is its own only candidate (loss log 1 = 0), so every per-example gradient is 0 and F = 0
  would make the penalty hold nothing."""
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(4, 3)).astype(np.float32),
           'text': rng.normal(size=(4, 3)).astype(np.float32)}
  params = {'w': jnp.asarray(rng.normal(size=(3, 3)).astype(np.float32))}

  def contrastive(params, batch):   # row i's positive is text i, the other rows its negatives
    logits = batch['image'] @ params['w'] @ batch['text'].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(len(logits))).mean()

  assert float(jnp.abs(jax.grad(contrastive)(params, batch)['w']).max()) > 1e-3  # the batch's does
  with pytest.raises(ValueError, match='in-batch negatives'):
    ewc.fisher_diagonal(contrastive, params, [batch])
