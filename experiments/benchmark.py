r"""Throughput of our compiled steps, and of the transformers PyTorch model of the same config.

  python -m experiments.benchmark --model=gpt2|bert|vit|resnet|clip [--size=...] \
      --mode=train|infer [--batch_size=N] [--seq_len=N | --image_size=N] [--peer=torch] \
      [--dtype=float32|bfloat16] [--attention=auto|xla|cudnn] [--steps=N] [--warmup=N] \
      [--json_out=FILE] [--dry_run] [--malloc=retain|default]

What runs, on both sides, from one random initialisation (ours; no download):
  gpt2    GPT2LMHeadModel, causal-LM loss over the B x (T - 1) next tokens
  bert    BertForSequenceClassification, 2 labels (the GLUE fine-tuning task), no padding
  vit     ViTForImageClassification, 1000 classes
  resnet  ResNetForImageClassification, 1000 classes (train mode updates BatchNorm statistics)
  clip    CLIPModel, the symmetric contrastive loss over B image-text pairs
Every dropout is 0 on both sides (the same work, and cuDNN's fused attention needs it).
The peer is built by transformers from our save_pretrained output (the same config and the same
weights), so the first step's loss is the same on both sides: the JSON's loss_check shows it.

train = forward + backward + one AdamW update (lr 1e-4, weight decay 0.01 on every parameter):
ours one jax.jit step with the state donated; the peer loss.backward(), torch.optim.AdamW.step()
(fused where torch has it), zero_grad(). infer = the forward pass to the logits: ours jitted, the
peer under torch.inference_mode(). Both sides get the same batch every step.

Timing: `warmup` untimed steps of each side (ours also compiled before, timed as compile_s), and
more (up to MAX_WARMUP in all) while a warm-up round still page-faults (SETTLED_FAULTS): the
first steps of a process grow its heap to the steps' high-water mark and fault every new page
in, seconds of kernel time that no later step pays (GPT-2 small's third step of ours: 366,000
faults, 5.8 s against 3.3). Then `steps` rounds of one step of ours and one of the peer's,
alternating, so that background load hits both alike; the median step time of each side gives
its throughput, and each timed step's page faults are recorded (minor_faults). A step ends when its
results are on the device (jax.block_until_ready; torch.cuda.synchronize on a GPU).

Defaults (the issue's shapes): gpt2 small, 4 x 256 tokens; bert base, 8 x 128; vit b16 and
resnet 50, 8 images of 224 x 224; clip b32, 8 images of 224 x 224 + 8 texts of 77 tokens.

Memory: the command line runs both sides under glibc malloc settings that keep freed memory for
reuse (--malloc=retain, RETAIN_MALLOC: the process re-executes itself with GLIBC_TUNABLES set);
the JSON's "malloc" says which settings the run had.
"""

import dataclasses
import datetime
import json
import os
import sys
import platform
import shlex
import statistics
import tempfile
import time
from typing import Any, Callable

try:
  import resource  # page-fault counts (POSIX)
except ImportError:
  resource = None

# JAX must not take 75% of the GPU up front: the torch peer shares it in this process.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from absl import app, flags, logging  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ptm_jax  # noqa: E402
from ptm_jax.models import bert, clip, gpt2, layers, resnet, vit  # noqa: E402
from ptm_jax.train import hardware, objectives, optimizers, profiling, runtime  # noqa: E402
from experiments import profile_summary  # noqa: E402

MODELS = ('gpt2', 'bert', 'vit', 'resnet', 'clip')
_TINY_TRANSFORMER = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
# --size -> the family's config. 'tiny' sizes are for the tests.
SIZES: dict[str, dict[str, Any]] = {
    'gpt2': {'small': gpt2.PRESETS['gpt2-small'], 'medium': gpt2.PRESETS['gpt2-medium'],
             'large': gpt2.PRESETS['gpt2-large'], 'xl': gpt2.PRESETS['gpt2-xl'],
             'tiny': gpt2.PRESETS['gpt2-tiny']},
    'bert': {'base': bert.PRESETS['bert-base'], 'large': bert.PRESETS['bert-large'],
             'tiny': bert.PRESETS['bert-tiny']},
    'vit': {**{k.replace('vit-', '').replace('/', ''): v for k, v in vit.PRESETS.items()},
            'tiny': vit.ViTConfig(**_TINY_TRANSFORMER, image_size=32, patch_size=8)},
    'resnet': {**{k.replace('resnet', ''): v for k, v in resnet.PRESETS.items()},
               'tiny': resnet.ResNetConfig(embedding_size=16, hidden_sizes=(16, 32),
                                           depths=(1, 1), layer_type='basic')},
    'clip': {'b32': clip.PRESETS['clip-vit-base-patch32'],
             'b16': clip.PRESETS['clip-vit-base-patch16'],
             'l14': clip.PRESETS['clip-vit-large-patch14'], 'tiny': clip.PRESETS['clip-tiny']},
}
DEFAULT_SIZE = {'gpt2': 'small', 'bert': 'base', 'vit': 'b16', 'resnet': '50', 'clip': 'b32'}
# (batch_size, seq_len, image_size) when the flags leave them unset.
DEFAULT_SHAPE = {'gpt2': (4, 256, None), 'bert': (8, 128, None), 'vit': (8, None, 224),
                 'resnet': (8, None, 224), 'clip': (8, 77, 224)}
BERT_LABELS = 2
IMAGE_CLASSES = 1000
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
ATTENTION = {'auto': None, 'xla': 'xla', 'cudnn': 'cudnn'}

MFU_FORMULA = ('mfu = model_flops_per_step / (median step seconds x dense bf16 peak FLOP/s of '
               'the device); model_flops_per_step = XLA cost analysis of the forward pass to '
               'the loss (train: x3 for the backward pass) or to the logits (infer), lowered '
               "with the 'xla' attention so that attention counts in full (T x T, no causal "
               'discount); the optimizer update is not counted')
GPT2_ANALYTIC_FORMULA = ('per token: train 6 N + 12 L H Q T, infer 2 N + 4 L H Q T; N = '
                         'parameters less the position table (the tied LM head counted once), '
                         'attention in full (no causal halving)')
MEMORY_NOTES = {
    'ours_xla': 'XLA memory_analysis of the compiled step: arguments + outputs - donated '
                'aliases + temporaries (bytes the step needs on the device)',
    'ours_device': "jax device memory_stats()['peak_bytes_in_use']: the process's peak on the "
                   'device since start (initialisation included)',
    'peer_cuda': 'torch.cuda.max_memory_allocated() over the peer\'s steps (weights, optimizer '
                 'state, activations)',
    'peer_cpu': None,
}
PEER_CPU_MEMORY_REASON = ('not measured on CPU: the process-wide RSS mixes JAX and torch in one '
                          'process, and torch has no per-allocator peak on CPU')

FLAGS = flags.FLAGS
flags.DEFINE_enum('model', 'gpt2', MODELS, 'Model family.')
flags.DEFINE_string('size', None, 'Size within the family (default: gpt2 small, bert base, vit '
                    'b16, resnet 50, clip b32); see SIZES.')
flags.DEFINE_enum('mode', 'train', ('train', 'infer'), 'Full AdamW step, or forward only.')
flags.DEFINE_integer('batch_size', None, 'Examples per step (default: the family\'s).',
                     lower_bound=1)
flags.DEFINE_integer('seq_len', None, 'Tokens per text (gpt2, bert, clip).', lower_bound=1)
flags.DEFINE_integer('image_size', None, 'Image height = width (vit, resnet, clip).',
                     lower_bound=1)
flags.DEFINE_enum('peer', 'none', ('none', 'torch'), 'Also time the transformers model.')
flags.DEFINE_enum('dtype', 'float32', tuple(DTYPES), 'Compute dtype; bfloat16 is mixed '
                  'precision (float32 parameters; torch: autocast).')
flags.DEFINE_enum('attention', 'auto', tuple(ATTENTION), 'Our attention implementation '
                  '(jax.nn.dot_product_attention): auto lets JAX pick, cudnn is the fused '
                  'kernel on NVIDIA GPUs.')
# A warm-up round (one step of each side) that page-faults fewer pages than this (4 MB) has
# found the heap it needs; MAX_WARMUP bounds the warm-up steps where it never settles.
SETTLED_FAULTS = 1000
MAX_WARMUP = 12
flags.DEFINE_integer('steps', 5, 'Timed rounds (one step of each side per round).',
                     lower_bound=1)
flags.DEFINE_integer('warmup', 2, 'Untimed steps of each side before the rounds, at least; '
                     f'more (up to {MAX_WARMUP}) while a warm-up round still page-faults.')
# seed and dry_run share their names (and meaning) with flags of experiments/train.py and
# transfer_study.py; allow_override lets the entry points be imported into one process (the tests).
flags.DEFINE_integer('seed', 0, 'Seed of the weights and the batch.', allow_override=True)
flags.DEFINE_bool('scan_layers', False, 'Ours: one lax.scan over the transformer blocks '
                  '(model.scan_layers in the trainer); the same maths.')
flags.DEFINE_integer('vocabulary_multiple', layers.VOCABULARY_MULTIPLE, 'Ours, off CPU: the LM '
                     'heads\' tied table padded with zero rows to a multiple of this '
                     '(layers.VOCABULARY_MULTIPLE; 1: unpadded), the padding\'s logits sliced '
                     'off; the same maths.', lower_bound=1)
flags.DEFINE_string('json_out', None, 'Write the result here as well as to stdout.')
flags.DEFINE_string('xla_flags', runtime.CPU_XLA_FLAGS, 'Appended to XLA_FLAGS before JAX '
                    'starts; the default is the trainer\'s (runtime.CPU_XLA_FLAGS: XLA\'s Eigen '
                    'kernels for CPU dots and convolutions, not YNNPACK\'s). --xla_flags= runs '
                    'XLA\'s own defaults.')
flags.DEFINE_enum('malloc', 'retain', ('retain', 'default'), 'glibc malloc settings of the '
                  'process (both sides): retain = one arena that keeps freed memory for reuse '
                  '(RETAIN_MALLOC); default = glibc\'s own.')
PROFILED_STEPS = 3  # --profile_dir: steps of ours traced after the timed rounds
flags.DEFINE_string('profile_dir', '', f'Also write a jax.profiler trace of {PROFILED_STEPS} more '
                    'steps of ours '
                    'here (TensorBoard\'s profile tab or xprof) with the step\'s compiled text, '
                    'and print and record where the step\'s time went '
                    '(ptm_jax.train.profiling).')
flags.DEFINE_bool('dry_run', False, 'Compile ours only: compile time, memory and FLOPs, no '
                  'timing and no peer.', allow_override=True)


@dataclasses.dataclass(frozen=True)
class Options:
  """One benchmark run: the flags as values (see the flag definitions)."""
  model: str = 'gpt2'
  size: str | None = None
  mode: str = 'train'
  batch_size: int | None = None
  seq_len: int | None = None
  image_size: int | None = None
  peer: str = 'none'
  dtype: str = 'float32'
  attention: str = 'auto'
  steps: int = 5
  warmup: int = 2
  seed: int = 0
  scan_layers: bool = False
  vocabulary_multiple: int = layers.VOCABULARY_MULTIPLE
  dry_run: bool = False
  xla_flags: str = runtime.CPU_XLA_FLAGS
  profile_dir: str = ''


# ------------------------------------------------------------------------------------------------
# The model, its batch and its loss (ours).


def model_config(family: str, size: str, seq_len: int | None, image_size: int | None):
  """The family config for the benchmark: the size's preset, dropout off, the task's head size."""
  if size not in SIZES[family]:
    raise ValueError(f'Unknown --size {size!r} for {family}; choose one of '
                     f'{sorted(SIZES[family])}.')
  cfg = SIZES[family][size]
  if family == 'gpt2':
    cfg = dataclasses.replace(cfg, dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0)
    layers_check(seq_len, cfg.max_position_embeddings)
  elif family == 'bert':
    cfg = dataclasses.replace(cfg, dropout=0.0, attention_dropout=0.0, num_labels=BERT_LABELS)
    layers_check(seq_len, cfg.max_position_embeddings)
  elif family == 'vit':
    cfg = dataclasses.replace(cfg, dropout=0.0, attention_dropout=0.0, num_labels=IMAGE_CLASSES,
                              image_size=image_size)
  elif family == 'resnet':
    cfg = dataclasses.replace(cfg, num_labels=IMAGE_CLASSES)
  else:
    layers_check(seq_len, cfg.text_config.max_position_embeddings)
    cfg = dataclasses.replace(
        cfg, text_config=dataclasses.replace(cfg.text_config, attention_dropout=0.0),
        vision_config=dataclasses.replace(cfg.vision_config, attention_dropout=0.0,
                                          image_size=image_size))
  return cfg


def layers_check(seq_len: int, max_positions: int):
  if seq_len > max_positions:
    raise ValueError(f'--seq_len {seq_len} is more than the model\'s {max_positions} positions.')


def build_module(family: str, cfg, dtype, attention_impl: str | None) -> nn.Module:
  kwargs = {'dtype': dtype}
  if family != 'resnet':  # convolutions only: no attention to choose
    kwargs['attention_impl'] = attention_impl
  if family == 'gpt2':
    return gpt2.GPT2(cfg, head='lm', **kwargs)
  if family == 'bert':
    return bert.Bert(cfg, head='sequence_classification', **kwargs)
  if family == 'vit':
    return vit.ViT(cfg, head='classification', **kwargs)
  if family == 'resnet':
    return resnet.ResNet(cfg, head='classification', **kwargs)
  return clip.CLIP(cfg, **kwargs)


def make_batch(family: str, cfg, batch_size: int, seq_len: int | None, image_size: int | None,
               seed: int) -> dict[str, np.ndarray]:
  """A random batch (numpy, our NHWC layout).

  gpt2: input_ids, labels (B, T) int32, labels = the next token, -100 at the last position.
  bert: input_ids (B, T), label (B,). vit/resnet: pixel_values (B, H, W, 3) float32, label (B,).
  clip: input_ids (B, T) ending in the end-of-text token (where the text is pooled),
  pixel_values (B, H, W, 3).
  """
  rng = np.random.default_rng(seed)
  b = batch_size
  if family == 'gpt2':
    ids = rng.integers(0, cfg.vocab_size, (b, seq_len), dtype=np.int32)
    labels = np.full_like(ids, objectives.IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    return {'input_ids': ids, 'labels': labels}
  if family == 'bert':
    return {'input_ids': rng.integers(0, cfg.vocab_size, (b, seq_len), dtype=np.int32),
            'label': rng.integers(0, cfg.num_labels, (b,), dtype=np.int32)}
  pixels = rng.standard_normal((b, image_size, image_size, 3), dtype=np.float32)
  if family in ('vit', 'resnet'):
    return {'pixel_values': pixels,
            'label': rng.integers(0, cfg.num_labels, (b,), dtype=np.int32)}
  text = cfg.text_config
  # Ids below the start and end tokens, so that the only end-of-text token is the last one.
  ids = rng.integers(0, min(text.eos_token_id, text.bos_token_id), (b, seq_len), dtype=np.int32)
  ids[:, -1] = text.eos_token_id
  return {'input_ids': ids, 'pixel_values': pixels}


def model_inputs(family: str, batch: dict) -> dict:
  keys = {'gpt2': ('input_ids',), 'bert': ('input_ids',), 'vit': ('pixel_values',),
          'resnet': ('pixel_values',), 'clip': ('input_ids', 'pixel_values')}[family]
  return {k: batch[k] for k in keys}


def make_loss_fn(module: nn.Module, family: str) -> Callable:
  """(params, extra, batch) -> (float32 loss, new extra); extra is ResNet's batch_stats."""

  def loss_fn(params, extra, batch):
    variables = {'params': params, **extra}
    inputs = model_inputs(family, batch)
    if family == 'resnet':
      out, extra = module.apply(variables, **inputs, train=True, mutable=['batch_stats'])
    else:
      out = module.apply(variables, **inputs)
    if family == 'gpt2':
      loss, _ = objectives.causal_lm_loss(out.logits, batch['labels'])
    elif family == 'clip':
      loss, _ = objectives.clip_contrastive_loss(out.image_embeds, out.text_embeds,
                                                 params['logit_scale'])
    else:
      loss, _ = objectives.classification_loss(out.logits, batch['label'])
    return loss, extra

  return loss_fn


def make_infer_fn(module: nn.Module, family: str) -> Callable:
  """(variables, batch) -> logits: (B, T, V) gpt2, (B, K) bert/vit/resnet, (B, B) clip."""

  def infer(variables, batch):
    out = module.apply(variables, **model_inputs(family, batch))
    return out.logits_per_image if family == 'clip' else out.logits

  return infer


def make_optimizer() -> optax.GradientTransformation:
  """AdamW as torch.optim.AdamW's defaults, with weight decay on every parameter (as torch)."""
  tx, _ = optimizers.make_optimizer(
      {'name': 'adamw', 'learning_rate': LEARNING_RATE, 'weight_decay': WEIGHT_DECAY,
       'weight_decay_mask': 'all'}, total_steps=1)
  return tx


def make_train_step(loss_fn, tx) -> Callable:
  """(state, batch) -> (state, loss before the update); state = params, opt_state, extra."""

  def train_step(state, batch):
    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state['extra'], batch)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return {'params': params, 'opt_state': opt_state, 'extra': extra}, loss

  return train_step


def memory_bytes(compiled) -> int | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def gpt2_analytic_flops(cfg: gpt2.GPT2Config, params, batch_size: int, seq_len: int,
                        mode: str) -> float:
  """GPT2_ANALYTIC_FORMULA's FLOPs per step (PaLM's appendix B estimate, nanoGPT's MFU)."""
  n = count_params(params) - cfg.max_position_embeddings * cfg.hidden_size
  head_dim = cfg.hidden_size // cfg.num_heads
  attention = cfg.num_layers * cfg.num_heads * head_dim * seq_len
  per_token = 6 * n + 12 * attention if mode == 'train' else 2 * n + 4 * attention
  return float(per_token * batch_size * seq_len)


# ------------------------------------------------------------------------------------------------
# The peer (transformers, PyTorch).


def build_peer(module: nn.Module, variables: dict, device: str):
  """The transformers model of our module's config and weights, through save_pretrained."""
  import torch  # Imported here: only --peer=torch needs it.
  import transformers
  with tempfile.TemporaryDirectory() as folder:
    ptm_jax.save_pretrained(module, variables, folder)
    with open(os.path.join(folder, 'config.json')) as f:
      architecture = json.load(f)['architectures'][0]
    # sdpa: transformers' default and its fastest attention on both CPU and GPU (ResNet has
    # no attention, and transformers refuses the argument there).
    kwargs = {} if architecture.startswith('ResNet') else {'attn_implementation': 'sdpa'}
    model = getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float32,
                                                                **kwargs)
  return model.to(device), architecture


def torch_batch(family: str, batch: dict, device: str) -> dict:
  """Our numpy batch in the peer's layout: int64 ids, NCHW images, the loss's labels."""
  import torch
  out = {}
  if 'input_ids' in batch:
    out['input_ids'] = torch.from_numpy(batch['input_ids'].astype(np.int64))
  if 'pixel_values' in batch:
    out['pixel_values'] = torch.from_numpy(
        np.ascontiguousarray(batch['pixel_values'].transpose(0, 3, 1, 2)))
  if family == 'gpt2':
    out['labels'] = out['input_ids']  # transformers shifts the labels itself
    # No key/value cache (config.use_cache is True): ours builds none, and filling it copies
    # every layer's keys and values.
    out['use_cache'] = False
  elif family in ('bert', 'vit', 'resnet'):
    out['labels'] = torch.from_numpy(batch['label'].astype(np.int64))
  else:
    out['return_loss'] = True
  return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


class TorchPeer:
  """One train or infer step of the transformers model: __call__() -> loss or logits."""

  def __init__(self, model, family: str, mode: str, batch: dict, dtype: str, device: str):
    import torch
    self.torch = torch
    self.model, self.family, self.mode, self.device = model, family, mode, device
    self.batch = batch
    self.autocast = (torch.autocast(device_type=device.split(':')[0], dtype=torch.bfloat16)
                     if dtype == 'bfloat16' else None)
    if mode == 'train':
      model.train()  # dropout is 0; ResNet's BatchNorm uses and updates batch statistics
      try:  # the fused kernel is torch's fastest AdamW (CUDA, and CPU in recent versions)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE,
                                           weight_decay=WEIGHT_DECAY, fused=True)
        self.optimizer_kind = 'torch.optim.AdamW(fused=True)'
      except (RuntimeError, ValueError):
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE,
                                           weight_decay=WEIGHT_DECAY)
        self.optimizer_kind = 'torch.optim.AdamW'
    else:
      model.eval()
      self.optimizer_kind = None

  def _forward(self, inputs):
    if self.autocast is None:
      return self.model(**inputs)
    with self.autocast:
      return self.model(**inputs)

  def __call__(self):
    torch = self.torch
    if self.mode == 'train':
      loss = self._forward(self.batch).loss
      loss.backward()
      self.optimizer.step()
      self.optimizer.zero_grad(set_to_none=True)
      result = loss.detach()
    else:
      inputs = {k: v for k, v in self.batch.items() if k not in ('labels', 'return_loss')}
      with torch.inference_mode():
        out = self._forward(inputs)
      result = out.logits_per_image if self.family == 'clip' else out.logits
    if self.device.startswith('cuda'):
      torch.cuda.synchronize()
    return result


# ------------------------------------------------------------------------------------------------
# The run.


def resolve_shape(opts: Options) -> tuple[int, int | None, int | None]:
  """(batch_size, seq_len, image_size): the flags, else the family's defaults."""
  batch, seq, image = DEFAULT_SHAPE[opts.model]
  batch = opts.batch_size or batch
  seq = opts.seq_len or seq
  image = opts.image_size or image
  return batch, seq, image


def _minor_faults() -> int:
  """The process's minor page faults so far (0 where the OS does not count them)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _timed(fn) -> tuple[Any, float, int]:
  """(fn(), its wall seconds, the minor page faults of the process meanwhile)."""
  faults = _minor_faults()
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start, _minor_faults() - faults


def run(opts: Options) -> dict:
  """Builds, compiles and times ours (and the peer); returns the JSON record (module docstring)."""
  if opts.vocabulary_multiple < 1:
    raise ValueError(f'vocabulary_multiple must be at least 1 (1: unpadded), got '
                     f'{opts.vocabulary_multiple}.')
  default_multiple = layers.VOCABULARY_MULTIPLE
  layers.VOCABULARY_MULTIPLE = opts.vocabulary_multiple  # read while the step is traced
  try:
    return _run(opts)
  finally:
    layers.VOCABULARY_MULTIPLE = default_multiple


def _run(opts: Options) -> dict:
  family = opts.model
  size = opts.size or DEFAULT_SIZE[family]
  batch_size, seq_len, image_size = resolve_shape(opts)
  if family in ('vit', 'resnet'):
    seq_len = None
  if family in ('gpt2', 'bert'):
    image_size = None
  cfg = model_config(family, size, seq_len, image_size)
  dtype = DTYPES[opts.dtype]
  attention_impl = ATTENTION[opts.attention]
  module = build_module(family, cfg, dtype, attention_impl)
  if opts.scan_layers:
    if family == 'resnet':
      raise ValueError('--scan_layers applies to transformer stacks; ResNet has none.')
    module = module.clone(layer_stack=layers.LayerStack(scan=True))
  device = jax.devices()[0]

  batch_np = make_batch(family, cfg, batch_size, seq_len, image_size, opts.seed)
  batch = jax.device_put(batch_np, device)
  # Initialised looped (the layout save_pretrained writes for the peer) and with the 'xla'
  # attention (cuDNN's kernel wants bf16; only the shapes matter here), then stacked for scan.
  init_module = build_module(family, cfg, dtype, None if family == 'resnet' else 'xla')
  init_inputs = model_inputs(family, batch_np)
  looped_variables = jax.jit(lambda r: nn.unbox(init_module.init(r, **init_inputs)))(
      jax.random.key(opts.seed))
  variables = (jax.jit(layers.stack_layers)(looped_variables) if opts.scan_layers
               else looped_variables)
  params = variables['params']
  extra = {k: v for k, v in variables.items() if k != 'params'}

  loss_fn = make_loss_fn(module, family)
  if opts.mode == 'train':
    tx = make_optimizer()
    state = {'params': params, 'opt_state': jax.jit(tx.init)(params), 'extra': extra}
    step = jax.jit(make_train_step(loss_fn, tx), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    # Keep the initial weights for the peer (the donated state is consumed by the first step).
    peer_variables = jax.device_get(looped_variables) if opts.peer == 'torch' else None
  else:
    step = jax.jit(make_infer_fn(module, family))
    start = time.perf_counter()
    compiled = step.lower(variables, batch).compile()
    compile_s = time.perf_counter() - start
    peer_variables = looped_variables

  # Model FLOPs from the looped module with the 'xla' attention (init_module): a fused kernel is a
  # custom call that XLA's cost analysis counts as zero FLOPs, and a scanned stack's loop body
  # once, not once per layer.
  looped_extra = {k: v for k, v in looped_variables.items() if k != 'params'}
  if opts.mode == 'train':
    forward_flops = hardware.flops_of(jax.jit(make_loss_fn(init_module, family)).lower(
        looped_variables['params'], looped_extra, batch))
    model_flops = 3 * forward_flops if forward_flops else None
  else:
    model_flops = hardware.flops_of(jax.jit(make_infer_fn(init_module, family)).lower(
        looped_variables, batch))

  if family in ('gpt2', 'bert'):
    items, unit = batch_size * seq_len, 'tokens/s'
    shape = {'batch_size': batch_size, 'seq_len': seq_len}
  elif family == 'clip':
    items, unit = batch_size, 'image-text pairs/s'
    shape = {'batch_size': batch_size, 'seq_len': seq_len, 'image_size': image_size}
  else:
    items, unit = batch_size, 'images/s'
    shape = {'batch_size': batch_size, 'image_size': image_size}

  peer = None
  if opts.peer == 'torch' and not opts.dry_run:
    import torch
    import transformers
    torch.manual_seed(opts.seed)
    torch_device = 'cuda' if device.platform == 'gpu' and torch.cuda.is_available() else 'cpu'
    if device.platform == 'gpu' and torch_device == 'cpu':
      raise RuntimeError('JAX runs on a GPU but torch sees none: the peer would run on the CPU. '
                         'Install a CUDA build of torch, or run without --peer.')
    model, architecture = build_peer(module, peer_variables, torch_device)
    peer = TorchPeer(model, family, opts.mode, torch_batch(family, batch_np, torch_device),
                     opts.dtype, torch_device)
    if torch_device == 'cuda':
      torch.cuda.reset_peak_memory_stats()
  del peer_variables, looped_variables

  if opts.mode == 'train':
    def ours():
      nonlocal state
      state, loss = compiled(state, batch)
      return jax.block_until_ready(loss)
  else:
    def ours():
      return jax.block_until_ready(compiled(variables, batch))

  times_ours, times_peer = [], []
  faults_ours, faults_peer = [], []
  check_ours, check_peer = [], []
  warmup_steps = 0
  if not opts.dry_run:
    # Warm-up: the first steps also give the loss check (train: the loss before and after one
    # identical update) or the logits of the two sides.
    least = max(opts.warmup, 2 if opts.mode == 'train' else 1)
    for i in range(max(least, MAX_WARMUP)):
      out, _, faults = _timed(ours)
      if opts.mode == 'train' and i < 2:
        check_ours.append(float(out))
      elif i == 0:
        check_ours.append(np.asarray(out, np.float32))
      if peer is not None:
        out, _, peer_faults = _timed(peer)
        faults += peer_faults
        if opts.mode == 'train' and i < 2:
          check_peer.append(float(out))
        elif i == 0:
          check_peer.append(out.float().cpu().numpy())
      warmup_steps = i + 1
      if warmup_steps >= least and faults < SETTLED_FAULTS:
        break
    for i in range(opts.steps):
      _, seconds, faults = _timed(ours)
      times_ours.append(seconds)
      faults_ours.append(faults)
      if peer is not None:
        _, seconds, faults = _timed(peer)
        times_peer.append(seconds)
        faults_peer.append(faults)
      logging.info('round %d/%d: ours %.4f s, peer %s s', i + 1, opts.steps, times_ours[-1],
                   f'{times_peer[-1]:.4f}' if times_peer else '-')
    if opts.profile_dir:  # after the timed rounds, so that tracing does not slow them
      profiling.write_hlo(compiled, opts.profile_dir, 'ours_step')
      with jax.profiler.trace(opts.profile_dir,
                              profiler_options=profiling.profiler_options()):
        for _ in range(PROFILED_STEPS):
          ours()

  platform_name = device.platform
  peak = hardware.peak_flops(device)

  def side(times, faults, flops):
    if not times:
      return {'throughput': None, 'unit': unit, 'step_s': None, 'times_s': []}
    median = statistics.median(times)
    # best_step_s: the fastest round, the least disturbed by other work on a shared machine.
    out = {'throughput': items / median, 'unit': unit, 'step_s': median,
           'best_step_s': min(times),
           'times_s': [round(t, 6) for t in times], 'minor_faults': faults}
    if flops:
      out['achieved_flops_per_s'] = flops / median
      out['mfu'] = flops / (median * peak) if peak else None
    return out

  ours_record = side(times_ours, faults_ours, model_flops)
  ours_record['compile_s'] = compile_s
  ours_record['peak_memory_bytes'] = memory_bytes(compiled)
  ours_record['peak_memory_note'] = MEMORY_NOTES['ours_xla']
  stats = device.memory_stats() if platform_name != 'cpu' else None
  if stats and 'peak_bytes_in_use' in stats:
    ours_record['device_peak_bytes_in_use'] = int(stats['peak_bytes_in_use'])
    ours_record['device_peak_bytes_in_use_note'] = MEMORY_NOTES['ours_device']
  ours_record['attention'] = opts.attention
  ours_record['scan_layers'] = opts.scan_layers
  ours_record['vocabulary_multiple'] = opts.vocabulary_multiple
  ours_record['num_params'] = count_params(params)
  ours_record['optimizer'] = 'optax.adamw (ptm_jax.train.optimizers)' if opts.mode == 'train' \
      else None

  peer_record = None
  if peer is not None:
    peer_record = side(times_peer, faults_peer, model_flops)
    peer_record['framework'] = (
        f'transformers {transformers.__version__} {architecture}, torch {torch.__version__} '
        f'eager' + ('' if family == 'resnet' else ', sdpa attention'))
    peer_record['optimizer'] = peer.optimizer_kind
    peer_record['compile_s'] = None  # eager: nothing is compiled ahead of the steps
    if peer.device.startswith('cuda'):
      peer_record['peak_memory_bytes'] = int(torch.cuda.max_memory_allocated())
      peer_record['peak_memory_note'] = MEMORY_NOTES['peer_cuda']
      peer_record['device'] = torch.cuda.get_device_name()
    else:
      peer_record['peak_memory_bytes'] = None
      peer_record['peak_memory_note'] = PEER_CPU_MEMORY_REASON
      peer_record['device'] = 'cpu'
      peer_record['threads'] = torch.get_num_threads()

  record = {
      'model': family, 'size': size, 'mode': opts.mode, 'shape': shape, 'dtype': opts.dtype,
      'device': _device_description(device),
      'ours': ours_record, 'peer': peer_record,
      'ratio': (ours_record['throughput'] / peer_record['throughput']
                if peer_record and peer_record['throughput'] else None),
      'model_flops_per_step': model_flops,
      'mfu_formula': MFU_FORMULA if peak else None,
      'peak_flops_per_s': peak,
      'task': TASKS[family],
      'steps': opts.steps, 'warmup': opts.warmup, 'warmup_steps': warmup_steps,
      'dry_run': opts.dry_run,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'versions': {'jax': jax.__version__, 'python': platform.python_version()},
  }
  if peer is not None:
    record['versions'].update(torch=torch.__version__, transformers=transformers.__version__)
  if opts.profile_dir:
    record['profile'] = _profile_record(opts.profile_dir)
  if family == 'gpt2':
    analytic = gpt2_analytic_flops(cfg, params, batch_size, seq_len, opts.mode)
    record['gpt2_analytic_flops_per_step'] = analytic
    record['gpt2_analytic_formula'] = GPT2_ANALYTIC_FORMULA
    if peak and ours_record['step_s']:
      record['ours']['gpt2_analytic_mfu'] = analytic / (ours_record['step_s'] * peak)
  if check_peer:
    if opts.mode == 'train':
      record['loss_check'] = {'ours': check_ours, 'peer': check_peer,
                              'what': 'loss of the first step (initial weights) and of the second '
                                      '(after one AdamW update), same batch'}
    else:
      record['logits_check'] = {
          'max_abs_diff': float(np.max(np.abs(check_ours[0] - check_peer[0]))),
          'max_abs_logit': float(np.max(np.abs(check_ours[0])))}
  return record


def _profile_record(profile_dir: str) -> dict:
  """Prints where the traced steps' time went; returns its totals per device for the JSON."""
  try:
    profile = profile_summary.run(profile_dir, os.path.join(profile_dir, 'ours_step.hlo.txt'),
                                  top=10, steps=PROFILED_STEPS)
  except Exception as e:  # pylint: disable=broad-except
    # A trace this reader does not know (another backend's format) must not cost the timings.
    logging.warning('The profile in %s was written but not summarized: %r', profile_dir, e)
    return {'dir': profile_dir, 'error': repr(e)}
  if not profile['modules']:
    logging.warning('The profile in %s: %s', profile_dir, profiling.NO_OPS)
  # Op time by category and phase per device (the top ops are in the printed table).
  return {'dir': profile_dir, 'modules': [
      {k: m[k] for k in ('device', 'module', 'op_seconds_per_step', 'span_seconds_per_step',
                         'executions', 'executions_counted', 'by_category', 'by_phase')}
      for m in profile['modules'] if m['module'].startswith('jit_')]}


TASKS = {
    'gpt2': 'causal LM (GPT2LMHeadModel), loss over the B x (T - 1) next tokens',
    'bert': f'sequence classification (BertForSequenceClassification), {BERT_LABELS} labels, '
            'no padding',
    'vit': f'image classification (ViTForImageClassification), {IMAGE_CLASSES} classes',
    'resnet': f'image classification (ResNetForImageClassification), {IMAGE_CLASSES} classes',
    'clip': 'contrastive image-text (CLIPModel), B pairs',
}


def _device_description(device: jax.Device) -> str:
  if device.platform == 'cpu':
    return f'cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})'
  return f'{device.platform} ({device.device_kind})'


def options_from_flags() -> Options:
  return Options(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Options)})


def command_line(opts: Options, json_out: str | None, malloc: str = 'retain') -> str:
  """The command that reproduces `opts` (the flags that differ from their defaults)."""
  words = ['python -m experiments.benchmark', f'--model={opts.model}', f'--mode={opts.mode}']
  for field in dataclasses.fields(Options):
    value = getattr(opts, field.name)
    if field.name not in ('model', 'mode') and value != field.default:
      words.append(shlex.quote(f'--{field.name}={value}'))
  if json_out:
    words.append(shlex.quote(f'--json_out={json_out}'))
  if malloc != 'retain':
    words.append(f'--malloc={malloc}')
  return ' '.join(words)


# --malloc=retain: glibc's malloc with one arena, no mmap'd chunks and no trimming, so that
# memory a step frees is reused by the next step instead of going back to the kernel. With
# glibc's defaults each side page-faulted in 1.3-1.8 GB every step here (gpt2 train: ours 440k
# minor faults, 1-4 s of kernel time a step, the most right after the peer's step; torch's 330k),
# and which side paid more depended on the order of the two (README: Benchmarks). Both sides
# run under the same settings. glibc reads them only at process start: main() re-executes the
# process with them set.
RETAIN_MALLOC = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                 'glibc.malloc.trim_threshold=68719476736')


def _exec_with_malloc(setting: str) -> None:
  """Re-executes this command under GLIBC_TUNABLES=RETAIN_MALLOC ('retain') unless it runs so."""
  if (setting != 'retain' or not sys.platform.startswith('linux')
      or os.environ.get('GLIBC_TUNABLES') == RETAIN_MALLOC):
    return
  if os.environ.get('GLIBC_TUNABLES'):
    raise ValueError(f'GLIBC_TUNABLES is set ({os.environ["GLIBC_TUNABLES"]!r}): unset it, or '
                     'pass --malloc=default to keep it.')
  sys.stdout.flush()
  sys.stderr.flush()
  env = dict(os.environ, GLIBC_TUNABLES=RETAIN_MALLOC)
  program = ['-m', __spec__.name] if __spec__ is not None else [sys.argv[0]]
  os.execve(sys.executable, [sys.executable, *program, *sys.argv[1:]], env)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  opts = options_from_flags()
  settings = runtime.default_config()
  settings.xla_flags = opts.xla_flags
  runtime.configure(settings)
  record = run(opts)
  record['xla_flags'] = os.environ.get('XLA_FLAGS', '')
  tunables = os.environ.get('GLIBC_TUNABLES')
  record['malloc'] = {'setting': 'retain' if tunables == RETAIN_MALLOC else 'default',
                      'glibc_tunables': tunables}
  record['command'] = command_line(opts, FLAGS.json_out, FLAGS.malloc)
  text = json.dumps(record, indent=2)
  print(text)
  if FLAGS.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
    with open(FLAGS.json_out, 'w') as f:
      f.write(text + '\n')


def _command_line_main(argv):
  _exec_with_malloc(FLAGS.malloc)  # the command line's process only, never an importer's
  main(argv)


if __name__ == '__main__':
  app.run(_command_line_main)
