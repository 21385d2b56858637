"""Every training config in configs/ runs end to end in its runlocal form.

TFDS datasets come from tfds.testing.mock_data (random examples shaped like the real features),
so configs that read TFDS need no network and no prepared data here.
"""

import glob
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import train
from ptm_jax.train import optimizers
from ptm_jax.train.config import finalize

ROOT = os.path.join(os.path.dirname(__file__), '..')


def load_config_module(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def training_configs():
  """configs/*.py whose config is the trainer's (it has total_steps)."""
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    if 'total_steps' in load_config_module(path).get_config():
      out.append(os.path.basename(path)[:-3])
  return out


CONFIGS = training_configs()


def test_the_recipes_are_all_here():
  assert {'digits', 'resnet_finetune', 'vit_finetune', 'bert_finetune', 'gpt2_finetune',
          'clip_pretrain', 'gpt_shakespeare_char', 'resnet50_imagenet', 'vit_b16_imagenet',
          'bert_base_pretrain', 'gpt2_pretrain'} <= set(CONFIGS)


def recipe(name, arg=''):
  return load_config_module(os.path.join(ROOT, 'configs', f'{name}.py')).get_config(arg)


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('arg', ['', 'runlocal'])
def test_config_builds_its_optimizer_and_schedule(name, arg):
  """Both forms pass the trainer's key check and the optimizer's checks (no training), and the
  schedule reaches the config's peak learning rate (at the end of its warm-up, or at ULMFiT's
  cut) and never goes below 0."""
  config = finalize(recipe(name, arg))
  opt, total = config.optimizer, config.total_steps
  kernel = jax.ShapeDtypeStruct((4, 4), jnp.float32)  # something weight decay applies to
  _, schedule = optimizers.make_optimizer(opt, total, params={'dense': {'kernel': kernel}})
  cut = math.floor((opt.decay_steps or total) * opt.cut_frac)
  steps = sorted({*np.linspace(0, total - 1, 50).astype(int).tolist(), opt.warmup_steps, cut})
  rates = [optimizers.learning_rate_at(schedule, t) for t in steps]
  assert max(rates) == pytest.approx(opt.learning_rate, rel=1e-9), (name, opt.schedule)
  assert min(rates) >= 0


def test_resnet50_imagenet_is_goyal_et_al_recipe():
  """Goyal et al. 2017, section 5.1: Nesterov momentum 0.9, lr 0.1 * batch / 256 after a 5-epoch
  gradual warm-up, weight decay 1e-4 not on the BatchNorm parameters, zero-initialised last
  BatchNorm scales, 90 epochs."""
  config = recipe('resnet50_imagenet')
  opt = config.optimizer
  steps_per_epoch = 1_281_167 / config.batch_size
  assert (opt.name, opt.momentum, opt.nesterov) == ('sgd', 0.9, True)
  assert opt.learning_rate == pytest.approx(0.1 * config.batch_size / 256)
  assert config.model.zero_init_residual  # each block's last BatchNorm scale starts at 0
  assert opt.weight_decay == 1e-4 and opt.weight_decay_mask == ''   # kernels only, not BN's 1-D
  assert config.total_steps == math.ceil(90 * steps_per_epoch)
  assert opt.warmup_steps == math.ceil(5 * steps_per_epoch)
  schedule = optimizers.make_schedule(opt, config.total_steps)
  assert optimizers.learning_rate_at(schedule, opt.warmup_steps) == pytest.approx(
      opt.learning_rate)
  optimizers.make_optimizer(opt, config.total_steps)  # nesterov is valid for sgd + momentum


def test_gpt2_pretrain_is_nanogpt_train_gpt2():
  """nanoGPT's config/train_gpt2.py over train.py's defaults: 12 x 1024 x 40 tokens per step,
  600k steps, lr 6e-4 with 2000 warm-up steps and a cosine to 6e-5 at 600k, AdamW (0.9, 0.95),
  wd 0.1, clip 1, no dropout; the model stays GPT-2's (the docstring says how to get nanoGPT's)."""
  config = recipe('gpt2_pretrain')
  opt = config.optimizer
  assert config.batch_size * config.data.seq_len == 12 * 1024 * 40
  assert config.total_steps == 600_000 and opt.decay_steps in (0, 600_000)
  assert (opt.name, opt.b1, opt.b2, opt.weight_decay, opt.grad_clip_norm) == (
      'adamw', 0.9, 0.95, 0.1, 1.0)
  assert (config.model.dropout, config.model.embedding_dropout,
          config.model.attention_dropout) == (0.0, 0.0, 0.0)
  # GPT-2's own model (biases, tanh GELU), so that the result saves as a GPT2LMHeadModel.
  assert 'use_bias' not in config.model and 'hidden_act' not in config.model

  def get_lr(it):  # nanoGPT's train.py
    learning_rate, warmup_iters, lr_decay_iters, min_lr = 6e-4, 2000, 600_000, 6e-5
    if it < warmup_iters:
      return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
      return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)

  schedule = optimizers.make_schedule(opt, config.total_steps)
  for it in (0, 1, 1999, 2000, 2001, 300_000, 599_999):
    assert optimizers.learning_rate_at(schedule, it) == pytest.approx(get_lr(it), rel=1e-12)


@pytest.mark.parametrize('name', CONFIGS)
def test_runlocal_config_trains_a_step(name, tmp_path):
  config = load_config_module(os.path.join(ROOT, 'configs', f'{name}.py')).get_config('runlocal')
  assert not config.init.from_pretrained, 'runlocal must need no download'
  if not (config.data.name or config.data.text_file or config.data.image_folder
          or config.data.table_file):
    # Recipes whose text file is a flag (gpt_shakespeare_char): a small play of our own.
    play = tmp_path.parent / f'{tmp_path.name}_play.txt'
    play.write_text(''.join(f'CITIZEN {i}:\nSpeak, speak of {i * 7 % 31}.\n\n'
                            for i in range(400)))
    config.data.text_file = str(play)
  with tfds.testing.mock_data(num_examples=16):
    summary = train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_logs = [r for r in records if r['split'] == 'train']
  assert train_logs and all(math.isfinite(r['loss']) for r in train_logs)
  assert {'step', 'loss', 'learning_rate', 'steps_per_sec'} <= set(train_logs[-1])
  throughput = {k for k in train_logs[-1] if k.endswith('_per_sec') and k != 'steps_per_sec'}
  # Padded text tasks do not count their padding as tokens processed.
  assert throughput == {'causal_lm': {'tokens_per_sec'},
                        'mlm_nsp': {'examples_per_sec', 'padded_tokens_per_sec'},
                        'text_classification': {'examples_per_sec', 'padded_tokens_per_sec'},
                        'image_classification': {'images_per_sec'},
                        'image_text': {'images_per_sec'}}.get(config.data.task,
                                                              {'examples_per_sec'}), throughput
  assert [r for r in records if r['split'] == 'eval'], 'no eval record'
  on_disk = json.load(open(tmp_path / 'summary.json'))
  assert on_disk['final_step'] == config.total_steps == summary['final_step']
  assert on_disk['total_params'] > 0 and on_disk['train_step_memory_bytes'] > 0
  assert os.path.exists(tmp_path / 'config.json')
  assert os.listdir(tmp_path / 'checkpoints')


def test_gpt2_finetune_keeps_only_block_inputs_for_the_backward_pass(tmp_path):
  """The recipe's remat + scan defaults shrink a LoRA step's compiled memory (dry run).

  With LoRA the weights are frozen, so what the backward pass keeps of the forward pass is most
  of the step's memory; keeping only each block's input must cut it. Without the scan XLA's CPU
  backend merges the recomputation back (the README's memory table), so both keys are needed.
  """
  module = load_config_module(os.path.join(ROOT, 'configs', 'gpt2_finetune.py'))
  play = tmp_path / 'play.txt'
  play.write_text('To be, or not to be, that is the question. ' * 200)
  memory = {}
  for name, model_overrides in (('recipe', {}), ('plain', {'remat': 'none', 'scan_layers': False})):
    config = module.get_config('runlocal')
    config.model.update(model_overrides)
    config.data.name, config.data.text_file, config.data.seq_len = '', str(play), 128
    config.model.num_layers = 4   # deep enough that the kept activations dominate (0.51 of plain)
    config.adapt.method = 'lora'
    summary = train.train_and_evaluate(config, str(tmp_path / name), dry_run=True)
    memory[name] = summary['train_step_memory_bytes']
  recipe = module.get_config().model
  assert recipe.remat == 'full' and recipe.scan_layers
  assert memory['recipe'] < 0.6 * memory['plain'], memory
