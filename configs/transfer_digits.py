r"""The transfer study's two kinds of run on the embedded digits: pre-train on 0-4, adapt to 5-9.

The study (`python -m experiments.transfer_study --workdir=DIR`) runs these; one run by hand:

  python -m experiments.train --config=configs/transfer_digits.py --workdir=/tmp/source
  python -m experiments.train --config=configs/transfer_digits.py:stage=target --workdir=/tmp/t \
      --config.init.from_pretrained=FOLDER --config.adapt.method=lora \
      --config.data.examples_per_class=10

Arguments:
  stage=source  digits 0-4, every training image, from random init.
  stage=target  digits 5-9 (relabelled 0-4), from `init.from_pretrained` (a transformers-format
                ViTModel folder: the source model without its classifier, so the target head is
                new) or from scratch when it is empty; `data.examples_per_class` sets the budget.
  runlocal      a few steps (the tests' form).

The model is a small ViT (4 blocks, 64 wide, patches of 2x2 pixels: 16 patches + [CLS]); it
pools the class token because that is what transformers' ViT format stores. Expected results
and run times: the study's docstring.
"""

from ptm_jax.train.config import base_config, parse_arg

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False, stage='source')
  if args.stage not in ('source', 'target'):
    raise ValueError(f"configs/transfer_digits.py: stage must be 'source' or 'target', not "
                     f'{args.stage!r}.')
  source = args.stage == 'source'
  c = base_config()
  # Every target run (any strategy, any budget) takes the same number of steps: the same compute,
  # so the comparison is between what each strategy learns, not how long it trains. 100 steps of
  # 32 are 4-5 epochs of the whole 5-9 split, hundreds of epochs of the small budgets.
  c.total_steps = 12 if args.runlocal else (300 if source else 100)
  c.batch_size = 32
  c.log_every = 6 if args.runlocal else 50
  c.eval_every = 0              # once, at the end
  c.checkpoint_every = 0        # only the final state (the source model is exported from it)
  c.keep_checkpoints = 1

  c.data.name = 'digits'
  c.data.classes = SOURCE_CLASSES if source else TARGET_CLASSES
  c.data.task = 'image_classification'
  c.data.image_size = 8
  c.data.channels = 1
  c.data.augment = 'none'       # flips and crops change what a digit is
  c.data.normalization = 'vit'  # [0, 255] -> [-1, 1]
  c.data.eval_split = 'test'
  c.data.examples_per_class = 0  # the study sets the budget of target runs

  c.model.name = 'vit-ti/16'
  c.model.patch_size = 2        # 8x8 images -> 16 patches of 2x2
  c.model.hidden_size = 32 if args.runlocal else 64
  c.model.num_layers = 2 if args.runlocal else 4
  c.model.num_heads = 4
  c.model.intermediate_size = 64 if args.runlocal else 128
  c.model.pool_type = 'cls'     # transformers' ViT format has a class token

  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 2 if args.runlocal else (30 if source else 10)
  c.optimizer.grad_clip_norm = 1.0
  c.loss.label_smoothing = 0.1
  # The methods' sizes, scaled to a 64-wide model (their defaults are for 768-wide ones: an adapter
  # bottleneck of 64 would be no bottleneck here). Prompt tuning starts its soft tokens uniform:
  # an image model has no word embeddings to copy them from.
  c.adapt.adapter.bottleneck = 16
  c.adapt.prefix.hidden = 64
  c.adapt.prompt.init = 'uniform'
  return c
