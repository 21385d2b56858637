r"""A small ViT trained from scratch on the embedded handwritten digits (no download at all).

Command:
  python -m experiments.train --config=configs/digits.py --workdir=/tmp/digits

Expected result: test accuracy about 0.97 after 600 steps (batch 64, ~27 epochs of the 1,438
training images); about 1-2 minutes on 2 CPU cores. Arguments: runlocal (30 steps, a smoke test).
"""

from ptm_jax.train.config import base_config, parse_arg


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.total_steps = 30 if args.runlocal else 600
  c.batch_size = 64
  c.log_every = 10 if args.runlocal else 50
  c.eval_every = 0 if args.runlocal else 200
  c.checkpoint_every = 0 if args.runlocal else 200

  c.data.name = 'digits'
  c.data.task = 'image_classification'
  c.data.image_size = 8
  c.data.channels = 1
  c.data.augment = 'none'       # flips and crops change what a digit is
  c.data.normalization = 'vit'  # [0, 255] -> [-1, 1]
  c.data.eval_split = 'test'

  c.model.name = 'vit-ti/16'
  c.model.patch_size = 2        # 8x8 images -> 16 patches of 2x2
  c.model.hidden_size = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.intermediate_size = 256
  c.model.pool_type = 'gap'

  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 3 if args.runlocal else 50
  c.optimizer.grad_clip_norm = 1.0
  c.loss.label_smoothing = 0.1
  return c
