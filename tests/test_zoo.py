"""Every family through the same doors: init -> save_pretrained -> from_pretrained onto a mesh.

The per-family files check parity with transformers; this one checks what all families share:
every parameter carries logical axis names, loading places each tensor into a real sharding over
the 8 forced CPU devices, and the sharded model computes what the unsharded one does.
"""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

import ptm_jax
from ptm_jax import partitioning
from ptm_jax.hub import pretrained
from ptm_jax.models import bert, clip, gpt2, resnet, vit

TINY = {
    'bert': (bert.Bert(bert.PRESETS['bert-tiny'], head='pretraining'), {}),
    'gpt2': (gpt2.GPT2(gpt2.PRESETS['gpt2-tiny'], head='lm'), {}),
    'vit': (vit.ViT(dataclasses.replace(vit.PRESETS['vit-ti/16'], image_size=32, num_layers=2,
                                        hidden_size=64, num_heads=4, intermediate_size=128),
                    head='classification'), {}),
    'clip': (clip.CLIP(clip.PRESETS['clip-tiny']), {}),
    'resnet': (resnet.ResNet(dataclasses.replace(resnet.PRESETS['resnet18'], embedding_size=16,
                                                 hidden_sizes=(16, 32, 32, 64),
                                                 depths=(1, 1, 1, 1), num_labels=10),
                             head='classification'), {}),
}


def outputs_of(module, variables):
  out = module.apply(variables, **module.example_inputs(batch_size=2))
  return [np.asarray(x) for x in jax.tree.leaves(out)]


@pytest.mark.parametrize('family', list(TINY))
def test_save_load_onto_mesh(family, tmp_path):
  module, _ = TINY[family]
  boxed = jax.jit(lambda rng: module.init(rng, **module.example_inputs()))(jax.random.key(1))
  specs = jax.tree.leaves(partitioning.logical_specs(boxed.get('params')),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  variables = nn.unbox(boxed)
  leaves = jax.tree.leaves(variables['params'])
  assert len(specs) == len(leaves)
  for spec, leaf in zip(specs, leaves):  # One name (or None) per axis: the value was boxed.
    assert len(spec) == leaf.ndim, 'a parameter without logical axis names'

  ptm_jax.save_pretrained(module, variables, str(tmp_path))
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  loaded_module, loaded = ptm_jax.from_pretrained(str(tmp_path), mesh=mesh)
  assert type(loaded_module) is type(module)
  assert pretrained.family_for_module(loaded_module).name == family
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)

  sharded = [x for x in jax.tree.leaves(loaded) if not x.sharding.is_fully_replicated]
  assert sharded, 'nothing was sharded'
  for x in sharded:  # Each device holds a strict part of the array.
    assert x.addressable_shards[0].data.size < x.size
  for ours, reference in zip(outputs_of(loaded_module, loaded), outputs_of(module, variables)):
    np.testing.assert_allclose(ours, reference, atol=2e-5)
