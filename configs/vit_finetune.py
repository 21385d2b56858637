r"""Fine-tunes ViT-B/16 (ImageNet-21k pre-training, transformers format) on CIFAR-10 from TFDS.

Command:
  python -m experiments.train --config=configs/vit_finetune.py --workdir=/tmp/vit_c10

Prepare the data once: `tfds build cifar10 --file_format=array_record`. Weights: the hub id
google/vit-base-patch16-224-in21k (or --config.init.from_pretrained=PATH).
Expected result: about 0.98-0.99 test accuracy after 10,000 steps at batch 512, 224x224 (the ViT
paper's transfer setting; hours on one GPU; not run at full scale here).
Arguments: runlocal (random-init tiny ViT on 32x32 images, 2 steps: a smoke test).
"""

from ptm_jax.train.config import base_config, parse_arg


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.total_steps = 10_000
  c.batch_size = 512
  c.log_every, c.eval_every, c.checkpoint_every = 50, 1000, 1000
  c.init.from_pretrained = 'google/vit-base-patch16-224-in21k'
  c.data.name = 'cifar10'
  c.data.task = 'image_classification'
  c.data.image_size = 224
  c.data.crop_fraction = 1.0
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.learning_rate = 0.03
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 500
  c.optimizer.grad_clip_norm = 1.0
  if args.runlocal:
    c.total_steps, c.batch_size, c.log_every, c.eval_steps = 2, 8, 1, 1
    c.optimizer.warmup_steps = 1
    c.init.from_pretrained = ''
    c.model.name = 'vit-ti/16'
    c.model.patch_size = 8
    c.model.num_layers = 2
    c.model.hidden_size = 32
    c.model.num_heads = 2
    c.model.intermediate_size = 64
    c.data.image_size = 32
  return c
