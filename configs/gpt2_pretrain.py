r"""Pre-trains GPT-2 small (124M) from scratch on web text (TFDS c4/en): nanoGPT's recipe.

Command:
  python -m experiments.train --config=configs/gpt2_pretrain.py --workdir=/tmp/gpt2_small

Prepare the data once: `tfds build c4/en --file_format=array_record` (an Apache Beam dataset
built from a Common Crawl snapshot: pip install apache-beam, and run it on a Beam cluster; see
TFDS's beam_datasets guide). TFDS has no OpenWebText; a smaller corpus that one machine can build:
--config.data.name=wikipedia/20230601.en --config.data.train_split='train[:99%]'
--config.data.eval_split='train[99%:]'. The tokenizer is the hub id gpt2's byte-level BPE
(--config.data.tokenizer=PATH for a local folder); documents are packed into 1024-token rows with
<|endoftext|> between them.
The recipe (nanoGPT's config/train_gpt2.py over its train.py defaults): 491,520 tokens per step
(nanoGPT: 12 sequences x 40 accumulated micro-batches over 8 GPUs; here batch 480 x 1024 as 5
micro-batches of 96, i.e. 12 per GPU on 8), 600k steps, AdamW (0.9, 0.95) with weight decay 0.1 on the kernels and embeddings,
learning rate 6e-4 after 2000 warm-up steps then a cosine to 6e-5 at the last step, gradient
clipping at 1, no dropout, bfloat16 compute (float32 parameters). The model is GPT-2's own, with
its biases and the tanh GELU, so that the result saves as a transformers GPT2LMHeadModel; nanoGPT
trains without biases (train.py's bias=False) and with the exact GELU (model.py's nn.GELU()), which
`c.model.use_bias = False` and `c.model.hidden_act = 'gelu'` give (as gpt_shakespeare_char.py
sets them). The vocabulary stays at 50,257 (nanoGPT pads it to 50,304 for speed).
Expected result: not measured (no run at this scale here). nanoGPT reaches validation loss about
2.85 on OpenWebText with this recipe in about 4 days on 8 A100 40GB GPUs; C4 is another web
corpus, so its loss is not the same number. Memory: check yours with --dry_run (it compiles the
step for the configured mesh and batch and reports its memory); raise
--config.optimizer.grad_accum_steps (a divisor of 480 / data-parallel size) if it does not fit,
and --config.model.remat=dots to keep fewer activations.
Arguments: runlocal (random-init gpt2-tiny on byte tokens, 2 steps: a smoke test).
"""

from ptm_jax.train.config import base_config, parse_arg


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.total_steps = 600_000
  c.batch_size = 480
  c.log_every, c.eval_every, c.checkpoint_every, c.eval_steps = 100, 2000, 2000, 20
  c.model.name = 'gpt2-small'
  c.model.dtype = 'bfloat16'
  c.model.dropout = 0.0
  c.model.embedding_dropout = 0.0
  c.model.attention_dropout = 0.0
  c.data.name = 'c4/en'
  c.data.task = 'causal_lm'
  c.data.eval_split = 'validation'
  c.data.tokenizer = 'gpt2'
  c.data.seq_len = 1024
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 6e-4
  c.optimizer.min_learning_rate = 6e-5
  c.optimizer.schedule = 'cosine'   # decays until total_steps, as nanoGPT's lr_decay_iters
  c.optimizer.warmup_steps = 2000
  c.optimizer.warmup_style = 'nanogpt'
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.grad_accum_steps = 5
  if args.runlocal:
    c.total_steps, c.batch_size, c.log_every, c.eval_steps = 2, 8, 1, 1
    c.optimizer.warmup_steps = 1
    c.optimizer.grad_accum_steps = 1
    c.model.name = 'gpt2-tiny'
    c.model.dtype = 'float32'
    c.data.tokenizer = 'byte'
    c.data.seq_len = 32
  return c
