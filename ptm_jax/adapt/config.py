"""`config.adapt`: which parameters train, how, and at what rate. Every key with its default.

method (what trains by default; `rules` adjust it):
  full              every parameter (optionally with layer-wise learning-rate decay).
  frozen            only the head: feature extraction / linear probe.
  gradual_unfreeze  ULMFiT: the head first, then one layer group more every `unfreeze_every`
                    steps from the top; discriminative rates (each group down is `factor` slower).
  lora, dora, qlora low-rank updates of the `lora.targets` layers (QLoRA: their frozen kernels
                    stored as NF4) plus the head.
  adapter           Houlsby bottleneck adapters after the attention output and after the FFN,
                    plus every LayerNorm and the head.
  prefix            per-layer key/value prefixes (through a reparameterisation MLP) plus the head.
  prompt            soft prompt tokens before the input embeddings plus the head.

rules: ((regex, treatment), ...) over '/'-joined parameter paths ('bert/layer_3/attention/query/
kernel'), applied after the method's defaults, first match wins. treatment: 'freeze', 'train',
or a float learning-rate multiplier (trains at lr x multiplier).
"""

import ml_collections

METHODS = ('full', 'frozen', 'gradual_unfreeze', 'lora', 'dora', 'qlora', 'adapter', 'prefix',
           'prompt')
LOW_RANK = ('lora', 'dora', 'qlora')
QLORA_COMPUTE_DTYPES = ('bfloat16', 'float16', 'float32')

# Module paths LoRA adapts by default: every attention projection and both MLP layers of the
# shared transformer blocks (QLoRA's recipe: all linear layers but the LM head).
DEFAULT_LORA_TARGETS = r'(attention/(query|key|value|out)|mlp/(fc_in|fc_out))$'


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = 'full'
  c.rules = ()                    # ((regex, 'freeze' | 'train' | lr multiplier), ...)
  # The head, trained by every method: '' = the family's own (its classifier; nothing for a
  # tied LM head or CLIP). A regex over parameter paths otherwise.
  c.head = ''
  # ResNet's BatchNorm running statistics: False keeps updating them in training even when the
  # scales/offsets are frozen; True keeps the checkpoint's statistics (feature extraction).
  c.freeze_batch_stats = True
  c.layer_lr_decay = 1.0          # full: each layer group down trains at this x the one above
  c.gradual = ml_collections.ConfigDict({
      'unfreeze_every': 0,        # steps between two unfreezings (ULMFiT: one epoch); 0 = auto
      'factor': 2.6,              # discriminative rates: lr_{l-1} = lr_l / factor
  })
  c.lora = ml_collections.ConfigDict({
      'rank': 8,
      'alpha': 16.0,
      'rslora': False,            # scale alpha / sqrt(rank) instead of alpha / rank
      'dropout': 0.0,             # on the input of the low-rank branch only
      'targets': DEFAULT_LORA_TARGETS,   # regex over '/'-joined module paths
  })
  c.qlora = ml_collections.ConfigDict({
      'block_size': 64,
      'double_quant': True,
      'compute_dtype': 'bfloat16',
  })
  c.adapter = ml_collections.ConfigDict({'bottleneck': 64, 'init_std': 1e-3})
  c.prefix = ml_collections.ConfigDict({'length': 10, 'hidden': 512})
  c.prompt = ml_collections.ConfigDict({'length': 10, 'init': 'vocab'})  # or 'uniform'
  # The source task, for forgetting (its eval metric before and after), EWC and rehearsal:
  # config.data keys that differ from the target's (e.g. {'classes': (0, 1, 2, 3, 4)}); empty =
  # no source task.
  c.source = ml_collections.ConfigDict()
  c.ewc = ml_collections.ConfigDict({'weight': 0.0, 'fisher_batches': 8})
  # fraction of every training batch taken from the source task's training split.
  c.rehearsal = ml_collections.ConfigDict({'fraction': 0.0})
  return c


def merged_config(adapt_config) -> ml_collections.ConfigDict:
  """`adapt_config` over the defaults; unknown keys and bad values fail with the fix."""
  out = default_config()
  given = ml_collections.ConfigDict() if adapt_config is None else adapt_config

  def merge(base, new, prefix):
    for key, value in new.items():
      if prefix == 'adapt.' and key == 'source':  # config.data keys, checked by the pipeline
        base.source = ml_collections.ConfigDict(dict(value))
        continue
      if key not in base:
        raise ValueError(f'Unknown config key {prefix}{key}; known keys under {prefix[:-1]}: '
                         f'{sorted(base.keys())}.')
      if isinstance(base[key], ml_collections.ConfigDict):
        merge(base[key], value, f'{prefix}{key}.')
      else:
        base[key] = value
  merge(out, given, 'adapt.')
  if out.method not in METHODS:
    raise ValueError(f'config.adapt.method {out.method!r} is not one of {METHODS}.')
  out.rules = tuple(tuple(r) for r in out.rules)
  for rule in out.rules:
    if len(rule) != 2 or not isinstance(rule[0], str) or not (
        rule[1] in ('freeze', 'train') or isinstance(rule[1], (int, float))):
      raise ValueError(f'config.adapt.rules entry {rule!r} is not (regex, "freeze" | "train" | '
                       'learning-rate multiplier).')
  if out.lora.rank < 1:
    raise ValueError(f'config.adapt.lora.rank must be >= 1, got {out.lora.rank}.')
  if not 0.0 <= out.lora.dropout < 1.0:
    raise ValueError(f'config.adapt.lora.dropout must be in [0, 1), got {out.lora.dropout}.')
  if not isinstance(out.qlora.block_size, int) or out.qlora.block_size < 1:
    raise ValueError(f'config.adapt.qlora.block_size must be a whole number >= 1 (values per '
                     f'NF4 absmax; QLoRA uses 64), got {out.qlora.block_size!r}.')
  if out.qlora.compute_dtype not in QLORA_COMPUTE_DTYPES:
    raise ValueError(f'config.adapt.qlora.compute_dtype must be one of {QLORA_COMPUTE_DTYPES}, '
                     f'got {out.qlora.compute_dtype!r}.')
  if out.layer_lr_decay <= 0 or out.gradual.factor <= 0:
    raise ValueError('config.adapt.layer_lr_decay and gradual.factor must be > 0.')
  if out.prompt.init not in ('vocab', 'uniform'):
    raise ValueError(f"config.adapt.prompt.init must be 'vocab' or 'uniform', got "
                     f'{out.prompt.init!r}.')
  if not 0.0 <= out.rehearsal.fraction < 1.0:
    raise ValueError(f'config.adapt.rehearsal.fraction must be in [0, 1), got '
                     f'{out.rehearsal.fraction}.')
  if (out.ewc.weight > 0 or out.rehearsal.fraction > 0) and not out.source:
    raise ValueError('config.adapt.ewc.weight and rehearsal.fraction need the source task: set '
                     "config.adapt.source to its config.data keys (e.g. {'classes': (0, 1)}).")
  if out.ewc.weight < 0 or out.ewc.fisher_batches < 1:
    raise ValueError('config.adapt.ewc.weight must be >= 0 and ewc.fisher_batches >= 1.')
  return out
