r"""nanoGPT's shakespeare_char CPU recipe: a 4-layer character-level GPT on tiny Shakespeare.

Command:
  python -m experiments.train --config=configs/gpt_shakespeare_char.py --workdir=/tmp/shakespeare \
      --config.data.text_file=/path/to/tinyshakespeare.txt

The recipe (nanoGPT's `--device=cpu --compile=False --eval_iters=20 --log_interval=1
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0`): lr 1e-3, 100 warm-up steps, cosine to 1e-4, AdamW beta2
0.99, weight decay 0.1, clip 1.0; the validation split is the last 10% of the characters.
nanoGPT reaches val loss about 1.88 with it. Arguments: runlocal (50 steps, for smoke tests).
"""

from ptm_jax.train.config import base_config, parse_arg


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.total_steps = 50 if args.runlocal else 2000
  c.batch_size = 12
  c.log_every, c.eval_every, c.checkpoint_every = 10 if args.runlocal else 100, 0, 0
  c.eval_steps = 2 if args.runlocal else 0
  c.eval_batch_size = 96     # the whole validation split, 1,743 windows, in 19 batches
  # Two CPU devices, data-parallel (6 rows each): XLA runs each device's program on its own
  # thread, which keeps both cores busy through the elementwise work that one device would run
  # on one thread (40 vs 53 ms a step on 2 cores). In a process where JAX already runs (tests,
  # notebooks) the device count is left as it is, and mesh.devices=2 takes two of the devices
  # there.
  c.runtime.cpu_devices = 2
  # Each device's kernels on one thread: the other core is the other device's (about 34 vs
  # 32 ms a step; ptm_jax.train.runtime.single_core_compilation).
  c.runtime.single_core_kernels = True
  c.mesh.devices = 2 if args.runlocal else 0
  c.mesh.data = -1
  c.data.task = 'causal_lm'
  c.data.text_file = ''     # set --config.data.text_file
  c.data.tokenizer = 'char'
  c.data.seq_len = 64
  c.data.train_split, c.data.eval_split = 'train', 'val'
  c.data.val_fraction = 0.1
  c.model.name = 'gpt2-small'
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.hidden_size = 128
  c.model.hidden_act = 'gelu'   # nanoGPT's nn.GELU() is the exact (erf) form, not GPT-2's tanh
  c.model.use_bias = False      # nanoGPT's bias=False: no biases in Linear layers or LayerNorms
  c.model.max_position_embeddings = 64
  c.model.dropout = 0.0
  c.model.embedding_dropout = 0.0
  c.model.attention_dropout = 0.0
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.min_learning_rate = 1e-4
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 10 if args.runlocal else 100
  c.optimizer.warmup_style = 'nanogpt'
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip_norm = 1.0
  return c
