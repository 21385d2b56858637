"""Every training config in configs/ runs end to end in its runlocal form.

TFDS datasets come from tfds.testing.mock_data (random examples shaped like the real features),
so configs that read TFDS need no network and no prepared data here.
"""

import glob
import importlib.util
import json
import math
import os

import pytest
import tensorflow_datasets as tfds

from experiments import train

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
  assert any(k.endswith('_per_sec') and k != 'steps_per_sec' for k in train_logs[-1])
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
