r"""Pre-trains ViT-B/16 from scratch on ImageNet-1k (TFDS imagenet2012): big_vision's plain recipe.

Command:
  python -m experiments.train --config=configs/vit_b16_imagenet.py --workdir=/tmp/vit_b16_i1k

Prepare the data once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from
image-net.org, after registering) in DIR, then
`tfds build imagenet2012 --file_format=array_record --manual_dir=DIR`.
The recipe ("Better plain ViT baselines for ImageNet-1k", Beyer, Zhai and Kolesnikov 2022;
big_vision's configs/vit_s16_i1k.py) applied to B/16: batch 1024, Adam (0.9, 0.999) with
decoupled weight decay, learning rate 1e-3 after 10k warm-up steps then a cosine to 0, gradient
clipping at global norm 1, global-average pooling, a tanh pre-logits layer, inception crops +
flips + RandAugment (2 ops, magnitude 9 here, 10 there), inputs in [-1, 1], 300 epochs.
big_vision's wd 1e-4 is not scaled by the learning rate; optax's AdamW multiplies its decay by
the learning rate, so the same decay is weight_decay 0.1 here. What ptm_jax lacks: mixup (p 0.2
there; label smoothing 0.1 stands in), fixed 2-D sin-cos position embeddings (learned here).
Expected result: not measured (no run at this scale here). Reference points: this recipe gives
ViT-S/16 76.5% top-1 after 90 epochs and 80% after 300 (Beyer et al. 2022); ViT-B/16 trained on
ImageNet-1k alone reaches 77.9% in the original ViT paper (Dosovitskiy et al. 2021, at 384 px)
and 81.8% with DeiT's much heavier augmentation (Touvron et al. 2021). Expect the high 70s.
Several days on one 8-GPU machine (DeiT-B's 300 epochs took 53 hours on 8 V100s); the host's
JPEG decoding and RandAugment must keep up (raise config.data.num_threads with its cores).
Arguments: runlocal (a random-init 2-layer ViT on 32x32 images, 2 steps: a smoke test).
"""

from ptm_jax.train.config import base_config, parse_arg

_TRAIN_IMAGES = 1_281_167  # imagenet2012's train split


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.batch_size = 1024
  c.total_steps = -(-300 * _TRAIN_IMAGES // c.batch_size)  # 300 epochs: 375,342 steps
  c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 5000
  c.model.name = 'vit-b/16'
  c.model.dtype = 'bfloat16'
  c.model.pool_type = 'gap'
  c.model.representation_size = 768
  c.model.layer_norm_eps = 1e-6     # flax's LayerNorm default, as big_vision trains with
  c.data.name = 'imagenet2012'
  c.data.task = 'image_classification'
  c.data.eval_split = 'validation'  # imagenet2012's test split has no labels
  c.data.image_size = 224
  c.data.augment = 'strong'         # random-resized crop + flip + RandAugment
  c.data.normalization = 'vit'      # [0, 255] -> [-1, 1]
  c.data.crop_fraction = 0.875      # eval: resize to 256, central 224 crop
  c.data.num_threads = 16           # JPEG decoding and RandAugment; scale with the host's cores
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3 * c.batch_size / 1024
  c.optimizer.weight_decay = 0.1    # = big_vision's decoupled 1e-4 at lr 1e-3
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 10_000
  c.optimizer.grad_clip_norm = 1.0
  c.loss.label_smoothing = 0.1
  if args.runlocal:
    c.total_steps, c.batch_size, c.log_every, c.eval_steps = 2, 8, 1, 1
    c.optimizer.warmup_steps = 1
    c.model.dtype = 'float32'
    c.model.patch_size = 8
    c.model.num_layers = 2
    c.model.hidden_size = 32
    c.model.num_heads = 2
    c.model.intermediate_size = 64
    c.model.representation_size = 32
    c.data.image_size = 32
    c.data.num_threads = 2
  return c
