r"""Fine-tunes an ImageNet ResNet-50 (transformers format) on CIFAR-10 from TFDS.

Command:
  python -m experiments.train --config=configs/resnet_finetune.py --workdir=/tmp/resnet_c10

Prepare the data once: `tfds build cifar10 --file_format=array_record`. The weights come from the
hub id microsoft/resnet-50 (or a local folder: --config.init.from_pretrained=PATH).
Expected result: about 0.96-0.97 test accuracy after 5,000 steps at batch 512 on 224x224 inputs
(hours on one GPU; untested at full scale here, no accelerator was lent).
Arguments: runlocal (random-init ResNet-18 on 32x32 images, 2 steps: a smoke test).
"""

from ptm_jax.train.config import base_config, parse_arg


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.total_steps = 5000
  c.batch_size = 512
  c.log_every, c.eval_every, c.checkpoint_every = 50, 1000, 1000
  c.init.from_pretrained = 'microsoft/resnet-50'
  c.data.name = 'cifar10'
  c.data.task = 'image_classification'
  c.data.image_size = 224
  c.data.crop_fraction = 1.0  # 32x32 images: upsample whole, no eval crop
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.learning_rate = 0.03
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 200
  c.optimizer.grad_clip_norm = 1.0
  if args.runlocal:
    c.total_steps, c.batch_size, c.log_every, c.eval_steps = 2, 8, 1, 1
    c.optimizer.warmup_steps = 1
    c.init.from_pretrained = ''
    c.model.name = 'resnet18'
    c.data.image_size = 32
  return c
