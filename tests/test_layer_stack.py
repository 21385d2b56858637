"""Remat and scan change how the blocks run, never what they compute.

Every family's transformer_stack is looped, rematerialised or scanned by `LayerStack`; the
scanned model, given the looped model's weights restacked by `stack_layers`, must give the same
outputs and (after `unstack_layers`) the same gradients.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptm_jax.models import bert, clip, generate, gpt2, layers, vit

TINY_VIT = vit.ViTConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                         image_size=16, patch_size=8, num_labels=5)


def _case(family):
  """(module factory taking a LayerStack, inputs, scalar loss of the module's output)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 1000, (2, 12)).astype(np.int32)
  mask = np.ones((2, 12), np.int32)
  mask[1, 9:] = 0
  if family == 'gpt2':
    cfg = dataclasses.replace(gpt2.PRESETS['gpt2-tiny'], num_layers=3)
    return (lambda s: gpt2.GPT2(cfg, head='lm', layer_stack=s),
            {'input_ids': ids, 'attention_mask': mask}, lambda out: jnp.mean(out.logits ** 2))
  if family == 'bert':
    cfg = dataclasses.replace(bert.PRESETS['bert-tiny'], num_layers=3)
    return (lambda s: bert.Bert(cfg, head='pretraining', layer_stack=s),
            {'input_ids': ids, 'attention_mask': mask},
            lambda out: (jnp.mean(out.prediction_logits ** 2)
                         + jnp.mean(out.seq_relationship_logits ** 2)))
  if family == 'vit':
    pixels = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    return (lambda s: vit.ViT(TINY_VIT, head='classification', layer_stack=s),
            {'pixel_values': pixels}, lambda out: jnp.mean(out.logits ** 2))
  cfg = clip.PRESETS['clip-tiny']
  pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  return (lambda s: clip.CLIP(cfg, layer_stack=s),
          {'input_ids': ids % 1000, 'attention_mask': mask, 'pixel_values': pixels},
          lambda out: jnp.mean(out.logits_per_text ** 2))


def _assert_close(got, want):
  """Within 1e-5 of each array's own scale: remat and scan may reassociate float sums."""
  def check(a, b):
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(float(np.abs(b).max()), 1e-3))
  jax.tree.map(check, got, want)


def _value_and_grad(module, params, inputs, loss):
  # Jitted: one compile is far quicker than dispatching every op of the backward pass eagerly.
  return jax.jit(jax.value_and_grad(lambda p: loss(module.apply({'params': p}, **inputs))))(
      params)


@pytest.mark.parametrize('family', ['gpt2', 'bert', 'vit', 'clip'])
def test_remat_and_scan_give_the_same_loss_and_gradients(family):
  make, inputs, loss = _case(family)
  looped = make(layers.LayerStack())
  params = nn.unbox(looped.init(jax.random.key(1), **inputs))['params']
  ref_loss, ref_grads = _value_and_grad(looped, params, inputs, loss)

  # Every family: remat alone; the other policies share its code path, so GPT-2 checks them.
  for policy in ('dots', 'full', 'dots_no_batch') if family == 'gpt2' else ('dots',):
    got_loss, got_grads = _value_and_grad(make(layers.LayerStack(remat=policy)), params,
                                          inputs, loss)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    _assert_close(got_grads, ref_grads)

  scanned = make(layers.LayerStack(remat='full', scan=True))
  stacked = layers.stack_layers(params)
  # The scanned module's own init has exactly the restacked structure and shapes.
  shapes = jax.eval_shape(lambda: nn.unbox(scanned.init(jax.random.key(1), **inputs)))['params']
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, stacked)
  got_loss, got_grads = _value_and_grad(scanned, stacked, inputs, loss)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
  _assert_close(layers.unstack_layers(got_grads), ref_grads)


def test_stack_and_unstack_are_inverse_and_name_the_stacked_axis():
  make, inputs, _ = _case('gpt2')
  boxed = make(layers.LayerStack(scan=True)).init(jax.random.key(0), **inputs)
  spec = nn.get_partition_spec(boxed)['params']['transformer']['layers']['mlp']['fc_in']
  assert spec['kernel'] == jax.sharding.PartitionSpec('layers', 'embed', 'mlp')
  params = nn.unbox(make(layers.LayerStack()).init(jax.random.key(0), **inputs))['params']
  stacked = layers.stack_layers(params)
  assert 'layer_0' not in stacked['transformer']
  assert stacked['transformer']['layers']['ln_mlp']['scale'].shape == (3, 64)
  jax.tree.map(np.testing.assert_array_equal, layers.unstack_layers(stacked), params)


def test_scanned_gpt2_generates_the_same_tokens():
  make, inputs, _ = _case('gpt2')
  looped = make(layers.LayerStack())
  params = nn.unbox(looped.init(jax.random.key(2), **inputs))['params']
  prompt = inputs['input_ids'][:, :5]
  want = generate.generate(looped, params, prompt, 6, greedy=True)
  got = generate.generate(make(layers.LayerStack(scan=True)), layers.stack_layers(params),
                          prompt, 6, greedy=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match='remat policy'):
    layers.LayerStack(remat='everything')
