r"""Fine-tunes GPT-2 (causal LM) on a text file, or on a TFDS text dataset.

Command:
  python -m experiments.train --config=configs/gpt2_finetune.py --workdir=/tmp/gpt2_ft \
      --config.data.text_file=/path/to/input.txt --config.data.name=''

By default the text is TFDS tiny_shakespeare (`tfds build tiny_shakespeare
--file_format=array_record`), packed into 256-token rows with GPT-2's tokenizer from the hub id
gpt2 (or --config.init.from_pretrained=PATH). Expected result: not measured yet (it needs the
gpt2 weights and an accelerator; neither was available where this was written): the validation
loss should fall well below the pre-trained model's over the 1,000 steps.
Arguments: runlocal (random-init gpt2-tiny on byte tokens, 2 steps: a smoke test).
"""

from ptm_jax.train.config import base_config, parse_arg


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.total_steps = 1000
  c.batch_size = 8
  c.log_every, c.eval_every, c.checkpoint_every, c.eval_steps = 20, 200, 500, 20
  c.init.from_pretrained = 'gpt2'
  c.data.name = 'tiny_shakespeare'
  c.data.task = 'causal_lm'
  c.data.eval_split = 'validation'
  c.data.seq_len = 256
  # Under LoRA or QLoRA the kept activations, not the weights, bound what fits: every block
  # keeps only its input for the backward pass and recomputes the rest (as QLoRA's recipe does
  # with gradient checkpointing), about a third more compute. The blocks run as one lax.scan,
  # which is also what keeps XLA's CPU backend from merging the recomputation back into the
  # forward pass. gradual_unfreeze needs --config.model.scan_layers=False (it unfreezes
  # layer_N by name).
  c.model.remat = 'full'
  c.model.scan_layers = True
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 3e-5
  c.optimizer.weight_decay = 0.01
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 50
  c.optimizer.grad_clip_norm = 1.0
  if args.runlocal:
    c.total_steps, c.batch_size, c.log_every, c.eval_steps = 2, 8, 1, 1
    c.init.from_pretrained = ''
    c.model.name = 'gpt2-tiny'
    c.data.tokenizer = 'byte'
    c.data.seq_len = 32
    c.optimizer.warmup_steps = 1
  return c
