"""Input pipelines: config.data -> global batches on the mesh (see pipeline.py for the flow).

  sources.py    random-access sources: TFDS (array_record), text files, image folders,
                JSONL/CSV tables, numpy arrays
  embedded.py   datasets that need no download (scikit-learn's handwritten digits)
  image.py      per-example image preprocessing and augmentation (numpy + PIL)
  text.py       tokenizers (char, byte, checkpoint), packing, BERT masking and NSP pairs
  pipeline.py   tasks, grain datasets, host sharding, resumable Loader
"""

from ptm_jax.data.pipeline import (DatasetInfo, Loader, TASKS, default_config, make_loader,
                                   make_tokenizer, open_split)
from ptm_jax.data.sources import ArraySource, DataError

__all__ = ['ArraySource', 'DataError', 'DatasetInfo', 'Loader', 'TASKS', 'default_config',
           'make_loader', 'make_tokenizer', 'open_split']
