r"""Fine-tunes BERT-base (uncased) on GLUE SST-2 from TFDS.

Command:
  python -m experiments.train --config=configs/bert_finetune.py --workdir=/tmp/bert_sst2

Prepare the data once: `tfds build glue/sst2 --file_format=array_record`. Weights and tokenizer:
the hub id bert-base-uncased (or --config.init.from_pretrained=PATH).
Expected result: about 0.92-0.93 validation accuracy after 3 epochs (6,300 steps at batch 32,
lr 2e-5: the BERT paper's recipe); under an hour on one GPU; not run at full scale here.
Arguments: runlocal (random-init bert-tiny on byte tokens, 2 steps: a smoke test).
"""

from ptm_jax.train.config import base_config, parse_arg


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.total_steps = 6300
  c.batch_size = 32
  c.log_every, c.eval_every, c.checkpoint_every = 50, 1000, 1000
  c.init.from_pretrained = 'bert-base-uncased'
  c.data.name = 'glue/sst2'
  c.data.task = 'text_classification'
  c.data.eval_split = 'validation'  # GLUE's test labels are hidden
  c.data.seq_len = 128
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 2e-5
  c.optimizer.weight_decay = 0.01
  c.optimizer.schedule = 'linear'
  c.optimizer.warmup_steps = 630
  if args.runlocal:
    c.total_steps, c.batch_size, c.log_every, c.eval_steps = 2, 8, 1, 1
    c.init.from_pretrained = ''
    c.model.name = 'bert-tiny'
    c.data.tokenizer = 'byte'
    c.data.seq_len = 32
    c.optimizer.warmup_steps = 1
  return c
