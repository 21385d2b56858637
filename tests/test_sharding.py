"""Sharded training gives one device's numbers: losses and parameters over data, FSDP and tensor.

A GPT-2 (causal LM) and a ViT (digits classifier) train a few steps with experiments/train.py on
one device and on meshes of the 8 forced CPU devices (tests/conftest.py): data, FSDP, tensor and
all three together. Every logged train loss, the eval loss and the final parameters (read back
from the run's last checkpoint) must agree with the single-device run to 1e-5 absolute. Sharding
changes only how the sums inside matmuls and reductions are split, so anything larger is a
partitioning bug (a dropped all-reduce, a mis-sharded batch, a mask or rng that depends on the
layout), not rounding. The single-device run of each model is shared by all its meshes
(module-scoped cache), so each model costs one run per mesh plus one.

The GPT-2 keeps attention dropout on: jax.random under jit draws the same bits whatever the
shardings (they change where values are computed, never which), so the masks must match too; an
rng folded with a device or shard index would fail here.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import train
from ptm_jax.train import checkpointing
from ptm_jax.train.config import base_config

STEPS = 4
# Absolute tolerance for losses (about 3.5 for GPT-2 and 2.3 for ViT, so it is also within 1e-5
# relative) and for every parameter entry.
TOLERANCE = 1e-5
# 32 distinct characters: the char tokenizer's vocabulary (32) divides the tensor axis (2, 4, 8).
ALPHABET = 'abcdefghijklmnopqrstuvwxyz .,;!\n'

# Mesh name -> config.mesh overrides; -1 takes the devices left over.
SINGLE_DEVICE = {'devices': 1, 'data': 1, 'fsdp': 1, 'tensor': 1}
MESHES = {
    'data8': {'data': 8, 'fsdp': 1, 'tensor': 1},
    'fsdp8': {'data': 1, 'fsdp': 8, 'tensor': 1},
    'tensor4': {'data': -1, 'fsdp': 1, 'tensor': 4},
    'data2_fsdp2_tensor2': {'data': 2, 'fsdp': 2, 'tensor': 2},
}


def _common(c):
  c.seed = 3
  c.total_steps = STEPS
  c.batch_size = 8  # one row per device under data=8 or fsdp=8
  c.log_every = 1
  c.eval_every = 0          # evaluate once, at the end
  c.eval_steps = 1
  c.checkpoint_every = 0    # checkpoint once, at the end
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.01
  # The attention key bias has a zero gradient (softmax ignores a shift shared by all keys), so
  # what it gets is rounding noise (~1e-12), which Adam with eps=1e-8 would blow up into updates
  # of ~lr/1000 that differ with the reduction order. eps=1e-6 keeps such noise out of the
  # parameters, while real gradients, orders of magnitude larger, are still normalised.
  c.optimizer.eps = 1e-6
  c.optimizer.grad_clip_norm = 1.0  # the global norm sums over every shard of every gradient
  return c


def gpt2_config(data_dir):
  """A 1-layer character-level GPT-2 on generated text; heads, MLP and vocab divide by 8."""
  text_file = os.path.join(data_dir, 'text.txt')
  if not os.path.exists(text_file):
    rng = np.random.default_rng(0)
    with open(text_file, 'w', encoding='utf-8') as f:
      f.write(''.join(rng.choice(list(ALPHABET), 8000)))
  c = _common(base_config())
  c.data.task = 'causal_lm'
  c.data.text_file = text_file
  c.data.tokenizer = 'char'
  c.data.seq_len = 16
  c.data.train_split, c.data.eval_split = 'train', 'val'
  c.model.name = 'gpt2-tiny'
  c.model.num_layers = 1
  c.model.hidden_size = 32
  c.model.num_heads = 8
  c.model.max_position_embeddings = 16
  # Dropout on the attention weights only: their (B, heads, T, T) masks are split over the batch
  # and the heads, i.e. over every mesh axis; each other dropout site adds compile time.
  c.model.dropout = 0.0
  c.model.embedding_dropout = 0.0
  c.model.attention_dropout = 0.1
  return c


def vit_config(data_dir):
  """A 1-layer ViT on the embedded 8x8 digits (no download); heads and MLP divide by 8."""
  del data_dir  # the digits are embedded
  c = _common(base_config())
  c.data.name = 'digits'
  c.data.task = 'image_classification'
  c.data.image_size = 8
  c.data.channels = 1
  c.data.augment = 'none'
  c.data.normalization = 'vit'
  c.model.name = 'vit-ti/16'
  c.model.patch_size = 2
  c.model.hidden_size = 32
  c.model.num_layers = 1
  c.model.num_heads = 8
  c.model.intermediate_size = 64
  c.model.pool_type = 'gap'
  return c


MODELS = {'gpt2': gpt2_config, 'vit': vit_config}
# Every mesh for GPT-2; for the ViT (a second family: patch convolution, classification head) the
# mesh with all three axes. Each case is a run with its own compiles (~10 s of CPU).
CASES = [('gpt2', mesh) for mesh in MESHES] + [('vit', 'data2_fsdp2_tensor2')]


def read_params(checkpoint_dir):
  """The params of the latest checkpoint in `checkpoint_dir`, as numpy arrays on the host."""
  step_dir = os.path.join(checkpoint_dir, str(STEPS), checkpointing.STATE_ITEM)
  with ocp.StandardCheckpointer() as reader:
    saved = reader.metadata(step_dir).item_metadata.tree
  # Every array onto one device: the comparison must not depend on how the run was sharded.
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), saved)
  with checkpointing.Checkpointer(checkpoint_dir) as checkpointer:
    restored = checkpointer.restore(abstract)
  assert restored is not None, f'no checkpoint in {checkpoint_dir}'
  step, state, _ = restored
  assert step == STEPS
  return jax.tree.map(np.asarray, state['params'])


def run(config, workdir):
  """(summary, train losses by step, final params) of one train_and_evaluate run."""
  summary = train.train_and_evaluate(config, str(workdir))
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  losses = {r['step']: r['loss'] for r in records if r['split'] == 'train'}
  assert sorted(losses) == list(range(1, STEPS + 1)), 'expected a train log every step'
  return summary, losses, read_params(os.path.join(workdir, 'checkpoints'))


@pytest.fixture(scope='module')
def single_device_runs(tmp_path_factory):
  """model name -> (data folder, its single-device run), made on first use, shared by meshes."""
  runs = {}

  def get(model):
    if model not in runs:
      data_dir = str(tmp_path_factory.mktemp(f'{model}_data'))
      config = MODELS[model](data_dir)
      config.mesh.update(SINGLE_DEVICE)
      runs[model] = (data_dir, run(config, tmp_path_factory.mktemp(f'{model}_single')))
    return runs[model]

  return get


@pytest.mark.parametrize('model,mesh_name', CASES)
def test_sharded_training_matches_one_device(model, mesh_name, single_device_runs,
                                             tmp_path_factory):
  data_dir, (ref_summary, ref_losses, ref_params) = single_device_runs(model)
  assert ref_summary['devices'] == 1
  config = MODELS[model](data_dir)
  config.mesh.update(MESHES[mesh_name])
  summary, losses, params = run(config, tmp_path_factory.mktemp(f'{model}_{mesh_name}'))

  assert summary['devices'] == 8
  expected_mesh = {k: v for k, v in MESHES[mesh_name].items() if v != -1}
  assert expected_mesh.items() <= summary['mesh'].items()
  assert summary['total_params'] == ref_summary['total_params']

  loss_diffs = {step: abs(losses[step] - ref_losses[step]) for step in ref_losses}
  assert max(loss_diffs.values()) <= TOLERANCE, (
      f'{model} on {summary["mesh"]}: train losses {losses} vs one device {ref_losses}')
  assert abs(summary['eval']['loss'] - ref_summary['eval']['loss']) <= TOLERANCE

  flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_params)[0])
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  assert flat.keys() == flat_ref.keys()
  for path, value in flat.items():
    np.testing.assert_allclose(value, flat_ref[path], rtol=0, atol=TOLERANCE,
                               err_msg=f'{model} {mesh_name}: {jax.tree_util.keystr(path)}')

  # The sharding is real: FSDP and tensor parallelism hold a fraction of the parameters per
  # device (small vectors whose dims the axes do not divide stay replicated); data parallelism
  # holds them all.
  ratio = summary['param_bytes_per_device'] / ref_summary['param_bytes_per_device']
  if mesh_name == 'data8':
    assert ratio == 1
  elif mesh_name == 'fsdp8':  # an eighth at best
    assert ratio < 0.25, ratio
  else:  # tensor 4, or fsdp 2 x tensor 2: a quarter at best
    assert ratio < 0.5, ratio


def test_a_mesh_that_does_not_fit_the_devices_fails_clearly(tmp_path):
  config = vit_config(str(tmp_path))
  config.mesh.update({'data': 3, 'fsdp': 1, 'tensor': 1})
  with pytest.raises(ValueError, match=r'needs 3 devices but 8 are present: set one axis to -1'):
    train.train_and_evaluate(config, str(tmp_path / 'product'))
  config.mesh.update({'data': -1, 'fsdp': 1, 'tensor': 3})
  with pytest.raises(ValueError, match=r'8 devices do not split .* make the fixed axes divide 8'):
    train.train_and_evaluate(config, str(tmp_path / 'leftover'))
  config.mesh.update({'data': 1, 'fsdp': 1, 'tensor': 1, 'devices': 9})
  with pytest.raises(ValueError, match=r'mesh.devices=9 .* set it to at most 8'):
    train.train_and_evaluate(config, str(tmp_path / 'devices'))


def test_a_batch_the_data_axes_do_not_divide_fails_clearly(tmp_path):
  config = vit_config(str(tmp_path))
  config.mesh.update({'data': 2, 'fsdp': 2, 'tensor': 2})
  config.batch_size = 6
  with pytest.raises(ValueError, match=r'batch_size 6 is not divisible by the data-parallel size '
                                       r'4 .* use a multiple of 4'):
    train.train_and_evaluate(config, str(tmp_path))
