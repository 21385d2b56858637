r"""The shakespeare_char recipe in eager PyTorch: the reference that configs/gpt_shakespeare_char.py
is measured against, run on the same machine and scored on the same validation windows.

This is this project's own PyTorch rendering of nanoGPT's model and recipe (not nanoGPT's code):
4 pre-LN blocks, 128 wide, 4 heads, no biases, exact GELU, tied word embedding and LM head,
N(0, 0.02) init with the residual projections at 0.02 / sqrt(2 L); AdamW (0.9, 0.99), weight
decay 0.1 on matrices and embeddings only, lr 1e-3 with nanoGPT's (it + 1) / (warmup + 1) warm-up
over 100 steps and cosine to 1e-4 at step 2000, gradient clipping at 1.0, batches of 12 uniformly
random 64-character windows of the first 90% of the text. It reports the validation loss over
every non-overlapping window of the last 10% (ptm_jax's eval) and nanoGPT's own estimate (the
mean over 20 random batches of 12 windows), with the wall time of the whole run.

  python -m experiments.shakespeare_torch_reference --text_file=PATH [--seed=0] [--steps=2000]

torch is a test/benchmark dependency (requirements-test.txt), never a runtime one.
"""

import json
import math
import time

from absl import app
from absl import flags
import numpy as np

_TEXT_FILE = flags.DEFINE_string('text_file', None, 'The tiny Shakespeare text.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the init and of the batches.')
_STEPS = flags.DEFINE_integer('steps', 2000, 'Optimizer steps (the schedule ends at 2000).')
_THREADS = flags.DEFINE_integer('threads', 0, 'torch intra-op threads (0: torch\'s default).')

LAYERS, HEADS, WIDTH, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, DECAY_STEPS = 1e-3, 1e-4, 100, 2000


def learning_rate(step: int) -> float:
  """nanoGPT's schedule at optimizer step `step` (0-based)."""
  if step < WARMUP:
    return LR * (step + 1) / (WARMUP + 1)
  ratio = min(1.0, (step - WARMUP) / (DECAY_STEPS - WARMUP))
  return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def build_model(vocab_size: int):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.ln_attention = nn.LayerNorm(WIDTH, bias=False)
      self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
      self.out = nn.Linear(WIDTH, WIDTH, bias=False)
      self.ln_mlp = nn.LayerNorm(WIDTH, bias=False)
      self.fc_in = nn.Linear(WIDTH, 4 * WIDTH, bias=False)
      self.fc_out = nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x_BxTxD):
      b, t, d = x_BxTxD.shape
      q, k, v = (y.view(b, t, HEADS, d // HEADS).transpose(1, 2)
                 for y in self.qkv(self.ln_attention(x_BxTxD)).split(d, dim=-1))
      attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x_BxTxD = x_BxTxD + self.out(attended.transpose(1, 2).reshape(b, t, d))
      return x_BxTxD + self.fc_out(F.gelu(self.fc_in(self.ln_mlp(x_BxTxD))))

  class CharGPT(nn.Module):

    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(vocab_size, WIDTH)
      self.wpe = nn.Embedding(BLOCK, WIDTH)
      self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
      self.final_ln = nn.LayerNorm(WIDTH, bias=False)
      for name, p in self.named_parameters():
        if p.dim() == 2:
          std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith(('out.weight', 'fc_out.weight')) \
              else 0.02
          nn.init.normal_(p, 0.0, std)

    def forward(self, ids_BxT, targets_BxT):
      x = self.wte(ids_BxT) + self.wpe(torch.arange(ids_BxT.shape[1]))
      for block in self.blocks:
        x = block(x)
      logits = self.final_ln(x) @ self.wte.weight.T   # tied LM head
      return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets_BxT.reshape(-1))

  return CharGPT()


def main(argv):
  del argv
  start = time.time()
  import torch  # pylint: disable=g-import-not-at-top
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  text = open(_TEXT_FILE.value, encoding='utf-8').read()
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  ids = np.array([index[c] for c in text], np.int64)
  split = int(0.9 * len(ids))
  train_ids, val_ids = torch.from_numpy(ids[:split]), torch.from_numpy(ids[split:])

  torch.manual_seed(1337 + _SEED.value)
  model = build_model(len(chars))
  matrices = [p for p in model.parameters() if p.dim() >= 2]
  vectors = [p for p in model.parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW([{'params': matrices, 'weight_decay': 0.1},
                                 {'params': vectors, 'weight_decay': 0.0}],
                                lr=LR, betas=(0.9, 0.99), eps=1e-8)

  def windows(data, starts):
    return (torch.stack([data[i:i + BLOCK] for i in starts]),
            torch.stack([data[i + 1:i + 1 + BLOCK] for i in starts]))

  train_start = time.time()
  for step in range(_STEPS.value):
    for group in optimizer.param_groups:
      group['lr'] = learning_rate(step)
    x, y = windows(train_ids, torch.randint(len(train_ids) - BLOCK, (BATCH,)).tolist())
    loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if (step + 1) % 500 == 0:
      print(f'step {step + 1} train loss {loss.item():.4f} '
            f'{(time.time() - train_start) / (step + 1) * 1e3:.1f} ms/step', flush=True)
  train_seconds = time.time() - train_start

  model.eval()
  with torch.no_grad():
    # Every token after the first predicted once, as ptm_jax evaluates: the full non-overlapping
    # windows, then the short one left at the end of the text; the mean is over tokens.
    n = (len(val_ids) - 1) // BLOCK
    total = 0.0
    for chunk in range(0, n, 96):
      starts = [i * BLOCK for i in range(chunk, min(n, chunk + 96))]
      total += model(*windows(val_ids, starts)).item() * len(starts) * BLOCK
    tail = val_ids[n * BLOCK:]
    if len(tail) > 1:
      total += model(tail[None, :-1], tail[None, 1:]).item() * (len(tail) - 1)
    val_loss = total / (len(val_ids) - 1)
    estimate = float(np.mean([model(*windows(val_ids, torch.randint(
        len(val_ids) - BLOCK, (BATCH,)).tolist())).item() for _ in range(20)]))
  print(json.dumps({'seed': _SEED.value, 'steps': _STEPS.value, 'val_loss': val_loss,
                    'val_loss_nanogpt_estimate': estimate,
                    'train_seconds': train_seconds, 'wall_seconds': time.time() - start,
                    'threads': torch.get_num_threads()}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['text_file'])
  app.run(main)
