"""GPT-2: parity with transformers both ways, the hub's checkpoint layout, cached generation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import ptm_jax
from ptm_jax.models import generate as gen
from ptm_jax.models import gpt2
from tests import parity

VOCAB = 101
HEADS = {None: transformers.GPT2Model, 'lm': transformers.GPT2LMHeadModel}
FIELDS = {None: ('last_hidden_state',), 'lm': ('logits',)}


def small_config(**kw):
  # Deliberately non-default: 6 heads of 8, an explicit n_inner, an unusual eps, 32 positions.
  return transformers.GPT2Config(
      vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=6, n_inner=72, n_positions=32,
      layer_norm_epsilon=1e-4, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **kw)


def torch_outputs(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


def reference_model(head, tmp_path, seed=0):
  torch.manual_seed(seed)
  model = parity.perturb(HEADS[head](small_config()).eval(), seed=seed)
  model.save_pretrained(tmp_path / 'hf')
  return model


@pytest.mark.parametrize('head', list(HEADS), ids=str)
def test_parity_both_directions(head, tmp_path):
  reference = reference_model(head, tmp_path)
  ids, mask = parity.token_batch(VOCAB, length=13)  # right padding; every position is compared
  expected = torch_outputs(reference, ids, mask)

  module, variables = ptm_jax.from_pretrained(str(tmp_path / 'hf'))
  assert module.head == head and module.config.intermediate_size == 72
  assert module.config.layer_norm_eps == 1e-4
  ours = module.apply(variables, input_ids=ids.astype(np.int32),
                      attention_mask=mask.astype(np.int32))
  for field in FIELDS[head]:
    assert parity.max_abs_diff(getattr(ours, field),
                               getattr(expected, field)) <= parity.TOLERANCE, field
  if head == 'lm':  # the base output under the head is GPT2Model's
    hidden = reference.transformer(input_ids=torch.tensor(ids),
                                   attention_mask=torch.tensor(mask)).last_hidden_state
    assert parity.max_abs_diff(ours.last_hidden_state, hidden) <= parity.TOLERANCE

  ptm_jax.save_pretrained(module, variables, str(tmp_path / 'ours'))
  reloaded = HEADS[head].from_pretrained(tmp_path / 'ours').eval()
  parity.assert_same_weights(reloaded, reference)
  again = torch_outputs(reloaded, ids, mask)
  for field in FIELDS[head]:
    # The same weights (checked above) and config: the same outputs, bit for bit.
    assert parity.max_abs_diff(getattr(again, field).numpy(), getattr(expected, field)) == 0


def test_hub_layout_without_prefix_with_buffers(tmp_path):
  """The hub's 'gpt2' is a GPT2LMHeadModel saved without 'transformer.' and with attn buffers."""
  reference = reference_model('lm', tmp_path)
  state = {k.removeprefix('transformer.'): v.contiguous()
           for k, v in reference.state_dict().items() if k != 'lm_head.weight'}
  for i in range(3):
    state[f'h.{i}.attn.bias'] = torch.tril(torch.ones(32, 32))[None, None]
    state[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
  state['lm_head.weight'] = reference.lm_head.weight.detach().clone()  # a tied copy
  hub = tmp_path / 'hub'
  hub.mkdir()
  safetensors.torch.save_file(state, hub / 'model.safetensors')
  (hub / 'config.json').write_text((tmp_path / 'hf' / 'config.json').read_text())

  ids, mask = parity.token_batch(VOCAB, length=9, seed=1)
  expected = torch_outputs(reference, ids, mask)
  for head in ('lm', None):
    module, variables = ptm_jax.from_pretrained(str(hub), head=head)
    out = module.apply(variables, input_ids=ids.astype(np.int32),
                       attention_mask=mask.astype(np.int32))
    field = 'logits' if head == 'lm' else 'last_hidden_state'
    want = expected.logits if head == 'lm' else reference.transformer(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    assert parity.max_abs_diff(getattr(out, field), want) <= parity.TOLERANCE

  # A bare GPT2Model checkpoint (no prefix) also loads under the tied LM head.
  base = tmp_path / 'base'
  reference.transformer.save_pretrained(base)
  module, variables = ptm_jax.from_pretrained(str(base), head='lm')
  out = module.apply(variables, input_ids=ids.astype(np.int32),
                     attention_mask=mask.astype(np.int32))
  assert parity.max_abs_diff(out.logits, expected.logits) <= parity.TOLERANCE


def test_residual_projections_init_scaled():
  cfg = gpt2.GPT2Config(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4,
                        max_position_embeddings=16)
  module = gpt2.GPT2(cfg, head='lm')
  params = nn.unbox(jax.jit(module.init)(jax.random.key(0), **module.example_inputs()))
  block = params['params']['transformer']['layer_0']
  assert abs(float(jnp.std(block['attention']['query']['kernel'])) - 0.02) < 0.001
  for kernel in (block['attention']['out']['kernel'], block['mlp']['fc_out']['kernel']):
    assert abs(float(jnp.std(kernel)) - 0.01) < 0.0005  # 0.02 / sqrt(2 * 2 layers)


def test_sequence_too_long_and_bad_config():
  module = gpt2.GPT2(gpt2.GPT2Config(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                                     max_position_embeddings=32), head='lm')
  with pytest.raises(ValueError, match='input_ids has 33 positions but the position table holds '
                     '32: truncate'):
    module.init(jax.random.key(0), input_ids=np.zeros((1, 33), np.int32))
  # generate checks before it traces anything, so shapes stand in for the weights.
  variables = jax.eval_shape(module.init, jax.random.key(0), **module.example_inputs())
  with pytest.raises(ValueError, match='prompt \\+ max_new_tokens is 34 tokens, so the model '
                     'would see 33 positions, but its position table holds 32: ask for at most 3'):
    gen.generate(module, variables, np.zeros((1, 30), np.int32), 4, greedy=True)
  with pytest.raises(ValueError, match='input_ids has no tokens'):
    gen.generate(module, variables, np.zeros((1, 0), np.int32), 1, greedy=True)
  with pytest.raises(ValueError, match=r'attention_mask has shape \(1, 5\) but input_ids has '
                     r'\(2, 5\)'):
    gen.generate(module, variables, np.zeros((2, 5), np.int32), 1, greedy=True,
                 attention_mask=np.ones((1, 5)))
  with pytest.raises(ValueError, match='shorten the prompt to at most 32 tokens'):
    gen.generate(module, variables, np.zeros((1, 33), np.int32), 1, greedy=True)
  # At the limit: 29 + 4 tokens, the last never fed back, so positions 0 ... 31 (as transformers).
  variables = module.init(jax.random.key(0), **module.example_inputs())
  prompt = np.arange(29, dtype=np.int32)[None] % VOCAB
  cached = gen.generate(module, variables, prompt, 4, greedy=True)
  assert cached.shape == (1, 33)
  np.testing.assert_array_equal(cached, gen.uncached_generate(module, variables, prompt, 4,
                                                              greedy=True))
  with pytest.raises(NotImplementedError, match='scale_attn_by_inverse_layer_idx'):
    gpt2.GPT2Config(scale_attn_by_inverse_layer_idx=True)
  with pytest.raises(ValueError, match='not divisible'):
    gpt2.GPT2Config(hidden_size=50, num_heads=4)


def test_filter_logits_top_k_and_nucleus():
  probs = np.array([[0.5, 0.05, 0.3, 0.15], [0.9, 0.04, 0.03, 0.03]])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  kept = lambda **kw: np.isfinite(np.asarray(gen.filter_logits(logits, **kw)))
  # Nucleus: smallest set reaching p; the top token always stays.
  np.testing.assert_array_equal(kept(top_p=0.75), [[1, 0, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(kept(top_p=0.85), [[1, 0, 1, 1], [1, 0, 0, 0]])
  np.testing.assert_array_equal(kept(top_p=0.1), [[1, 0, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(kept(top_k=2), [[1, 0, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(kept(top_k=2, top_p=0.5), [[1, 0, 0, 0], [1, 0, 0, 0]])
  with pytest.raises(ValueError, match='top_p'):
    gen.Sampling(top_p=1.5)


# The generation tests share one prompt shape (3, 7) and 12 new tokens, so that jit compiles
# each (cached or not, sampling) variant once for the whole file.
PROMPT_SHAPE, NEW = (3, 7), 12


@pytest.fixture(scope='module')
def lm(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('lm')
  reference = reference_model('lm', tmp_path, seed=3)
  module, variables = ptm_jax.from_pretrained(str(tmp_path / 'hf'))
  return reference, module, variables


def prompts(seed):
  return np.random.default_rng(seed).integers(0, VOCAB - 1, PROMPT_SHAPE).astype(np.int32)


@pytest.mark.parametrize('sampling', [
    dict(greedy=True),
    dict(temperature=0.8, top_k=20, top_p=0.9),
], ids=['greedy', 'temperature_top_k_top_p'])
def test_cached_generation_equals_uncached(lm, sampling):
  _, module, variables = lm
  ids = prompts(0)
  mask = np.ones(PROMPT_SHAPE, np.int32)
  mask[1, :2] = 0  # left padding
  mask[2, :5] = 0
  kw = dict(sampling, rng=jax.random.key(7), attention_mask=mask)
  cached = np.asarray(gen.generate(module, variables, ids, NEW, **kw))
  uncached = np.asarray(gen.uncached_generate(module, variables, ids, NEW, **kw))
  np.testing.assert_array_equal(cached, uncached)
  np.testing.assert_array_equal(cached[:, :7], ids)
  if not sampling.get('greedy'):  # a different key samples something else
    other = np.asarray(gen.generate(module, variables, ids, NEW,
                                    **{**kw, 'rng': jax.random.key(8)}))
    assert not np.array_equal(other, cached)


def test_greedy_matches_transformers(lm):
  reference, module, variables = lm
  ids = prompts(1)
  with torch.no_grad():
    theirs = reference.generate(
        torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.ones(PROMPT_SHAPE, dtype=torch.long), max_new_tokens=NEW,
        do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
  ours = np.asarray(gen.generate(module, variables, ids, NEW, greedy=True))
  assert theirs.shape == ours.shape == (3, 7 + NEW)
  np.testing.assert_array_equal(ours, theirs)


def test_left_padded_row_generates_as_alone(lm):
  _, module, variables = lm
  ids = prompts(2)
  unpadded = np.asarray(gen.generate(module, variables, ids, NEW, greedy=True))
  # Row 1 becomes a 4-token prompt behind 3 pads; the other rows must not notice.
  padded = ids.copy()
  padded[1, 3:] = ids[1, :4]
  padded[1, :3] = 5  # arbitrary ids under the padding
  mask = np.ones(PROMPT_SHAPE, np.int32)
  mask[1, :3] = 0
  batched = np.asarray(gen.generate(module, variables, padded, NEW, greedy=True,
                                    attention_mask=mask))
  alone = np.asarray(gen.generate(module, variables, ids[1:2, :4], NEW, greedy=True))
  np.testing.assert_array_equal(batched[[0, 2]], unpadded[[0, 2]])
  np.testing.assert_array_equal(batched[1, 7:], alone[0, 4:])
  with pytest.raises(ValueError, match='LEFT'):
    gen.generate(module, variables, ids, NEW, greedy=True, attention_mask=mask[:, ::-1])


def test_eos_then_pad(lm):
  _, module, variables = lm
  ids = prompts(3)
  free = np.asarray(gen.generate(module, variables, ids, NEW, greedy=True))[:, 7:]
  eos = int(free[0, 3])  # row 0's 4th greedy token becomes the end of sequence
  stopped = np.asarray(gen.generate(module, variables, ids, NEW, greedy=True, eos_token_id=eos,
                                    pad_token_id=VOCAB - 1))[:, 7:]
  for row_free, row_stopped in zip(free, stopped):
    end = int(np.argmax(row_free == eos)) if (row_free == eos).any() else NEW
    np.testing.assert_array_equal(row_stopped[:end + 1], row_free[:end + 1])
    assert (row_stopped[end + 1:] == VOCAB - 1).all()


def test_bias_free_gpt2_has_no_biases_and_refuses_transformers_export(tmp_path):
  cfg = dataclasses.replace(gpt2.PRESETS['gpt2-tiny'], use_bias=False)
  module = gpt2.GPT2(cfg, head='lm')
  variables = module.init(jax.random.key(0), **module.example_inputs())
  names = ['/'.join(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(variables))[0]]
  assert not [n for n in names if n.endswith('bias')]
  assert any(n.endswith('ln_f/scale') for n in names)
  with pytest.raises(ValueError, match='use_bias=False has no transformers equivalent'):
    ptm_jax.save_pretrained(module, variables, str(tmp_path))
