r"""Pre-trains ResNet-50 from scratch on ImageNet-1k (TFDS imagenet2012): Goyal et al.'s recipe.

Command:
  python -m experiments.train --config=configs/resnet50_imagenet.py --workdir=/tmp/resnet50_i1k

Prepare the data once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from
image-net.org, after registering) in DIR, then
`tfds build imagenet2012 --file_format=array_record --manual_dir=DIR`.
The recipe ("Accurate, Large Minibatch SGD", Goyal et al. 2017, section 5.1): SGD with Nesterov
momentum 0.9, learning rate 0.1 per 256 images (0.4 at batch 1024) after a 5-epoch linear
warm-up, weight decay 1e-4 (not on the BatchNorm scales and offsets; here on the conv and dense
kernels only), the last BatchNorm scale of each residual block starting at 0
(`model.zero_init_residual`), 90 epochs, random-resized crops and flips at 224, eval on a central
224 crop of the image resized to 256. Changes: the learning rate follows a cosine instead of
dropping 10x at epochs 30, 60 and 80 (the trainer has no step schedule); the warm-up starts from
0, not from 0.1 (the trainer's warm-up always starts at 0); BatchNorm statistics are over the whole batch
(theirs over 32 images per worker); and the model computes in bfloat16 (parameters and BatchNorm
statistics stay float32).
Expected result: about 76% top-1 on the validation split; Goyal et al. report 23.74% top-1
error at batch 8k (76.3% accuracy), as good as at batch 256, with the step schedule. On the
order of a day on one 8-GPU machine, where decoding JPEGs on the host sets the pace (raise
config.data.num_threads with the host's cores); not run at full scale here.
Arguments: runlocal (a random-init 2-block bottleneck ResNet on 32x32 images, 2 steps: a smoke
test).
"""

from ptm_jax.train.config import base_config, parse_arg

_TRAIN_IMAGES = 1_281_167  # imagenet2012's train split


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.batch_size = 1024
  c.total_steps = -(-90 * _TRAIN_IMAGES // c.batch_size)  # 90 epochs: 112,603 steps
  c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 5000
  c.model.name = 'resnet50'
  c.model.dtype = 'bfloat16'
  c.model.zero_init_residual = True  # Goyal et al. 5.1: each block's last BatchNorm scale at 0
  c.data.name = 'imagenet2012'
  c.data.task = 'image_classification'
  c.data.eval_split = 'validation'  # imagenet2012's test split has no labels
  c.data.image_size = 224
  c.data.augment = 'basic'          # random-resized crop + flip
  c.data.crop_fraction = 0.875      # eval: resize to 256, central 224 crop
  c.data.num_threads = 16           # JPEG decoding; scale with the host's cores
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True      # Goyal et al. 5.1 (standard momentum is 'equally effective')
  c.optimizer.learning_rate = 0.1 * c.batch_size / 256
  c.optimizer.weight_decay = 1e-4   # L2 on the kernels (ndim >= 2), as torch's SGD adds it
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = -(-5 * _TRAIN_IMAGES // c.batch_size)  # 5 epochs
  if args.runlocal:
    c.total_steps, c.batch_size, c.log_every, c.eval_steps = 2, 8, 1, 1
    c.optimizer.warmup_steps = 1
    c.model.dtype = 'float32'
    # Bottleneck blocks as in ResNet-50, but two narrow stages of one block: fast to compile.
    c.model.embedding_size = 8
    c.model.hidden_sizes = (16, 32)
    c.model.depths = (1, 1)
    c.data.image_size = 32
    c.data.num_threads = 2
  return c
