r"""Pre-trains CLIP ViT-B/32 from scratch on COCO captions (contrastive, over the global batch).

Command:
  python -m experiments.train --config=configs/clip_pretrain.py --workdir=/tmp/clip

Prepare the data once: `tfds build coco_captions --file_format=array_record` (needs TensorFlow to
build). The tokenizer comes from the hub id openai/clip-vit-base-patch32
(--config.data.tokenizer=PATH for a local folder). COCO's 118k images are far from CLIP's 400M
pairs: expect retrieval recall@1 of a few percent on the test split, a recipe to check the
objective and the sharding, not to reproduce CLIP (days on a pod; not run at full scale here).
Arguments: runlocal (clip-tiny on byte tokens and 32x32 images, 2 steps: a smoke test).
"""

from ptm_jax.train.config import base_config, parse_arg


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.total_steps = 20_000
  c.batch_size = 1024
  c.log_every, c.eval_every, c.checkpoint_every, c.eval_steps = 50, 2000, 2000, 20
  c.model.name = 'clip-vit-base-patch32'
  c.data.name = 'coco_captions'
  c.data.task = 'image_text'
  c.data.eval_split = 'val'
  c.data.tokenizer = 'openai/clip-vit-base-patch32'
  c.data.seq_len = 77
  c.data.image_size = 224
  c.data.crop_fraction = 1.0
  c.data.interpolation = 'bicubic'
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 5e-4
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.2
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 2000
  if args.runlocal:
    c.total_steps, c.batch_size, c.log_every, c.eval_steps = 2, 8, 1, 1
    c.model.name = 'clip-tiny'
    c.data.tokenizer = 'byte'
    c.data.seq_len = 16
    c.data.image_size = 32
    c.optimizer.warmup_steps = 1
  return c
