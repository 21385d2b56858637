"""Helpers for parity tests against transformers' PyTorch models."""

import numpy as np
import torch


# Max abs difference from transformers' float32 outputs for the tiny transformer models (BERT,
# GPT-2, ViT; matmul precision 'highest'): they reach about 1.5e-6. 1e-4 let a wrong model
# through: BERT with LayerNorm eps 1e-6 instead of 1e-12 was off by 2.4e-5, its classification
# logits with tanh GELU instead of erf by 3.4e-5.
TOLERANCE = 1e-5


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1):
  """Adds noise to every float parameter and buffer, so that LayerNorm scales, biases and
  BatchNorm statistics are not their trivial initial values. Variances stay positive."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
      if not t.is_floating_point():
        continue
      noise = torch.randn(t.shape, generator=g) * scale
      if name.endswith('running_var'):
        t.mul_(torch.exp(noise))
      else:
        t.add_(noise)
  return model


def assert_same_weights(reloaded: torch.nn.Module, reference: torch.nn.Module):
  """Every parameter and buffer of `reference` is in `reloaded`, bit for bit: a float32 round
  trip through the Flax layouts (transposes and reshapes) is exact, so any difference, in a
  weight the compared outputs use or not, is a conversion bug. (num_batches_tracked is not
  kept.)"""
  state = reloaded.state_dict()
  for key, value in reference.state_dict().items():
    if not key.endswith('num_batches_tracked'):
      assert key in state and torch.equal(state[key], value), key


def max_abs_diff(ours, theirs) -> float:
  ours = np.asarray(ours, np.float64)
  theirs = theirs.detach().numpy().astype(np.float64) if torch.is_tensor(theirs) else np.asarray(
      theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)))


def token_batch(vocab_size: int, batch: int = 3, length: int = 11, seed: int = 0,
                first_id: int = 0):
  """Random ids and a mask with right padding of different lengths (row 0 unpadded)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(first_id, vocab_size, (batch, length)).astype(np.int64)
  mask = np.ones((batch, length), np.int64)
  for b in range(1, batch):
    mask[b, length - 2 * b:] = 0
  return ids, mask


def calibrate_batch_norm(model: torch.nn.Module, inputs: torch.Tensor, seed: int = 0):
  """Sets every BatchNorm's running statistics to those of the model's own activations.

  A perturbed network with its BatchNorms left near (mean 0, var 1) does not normalise, and the
  activations of a deep stack grow into the thousands, where float32 rounding alone exceeds any
  useful absolute tolerance. Calibrated statistics are as far from trivial as real ones, and keep
  every output O(1), so parity can be asserted at an absolute 1e-4. A little noise is then added
  so that the statistics differ from those of the test batch itself.
  """
  norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  was_training = model.training
  for m in norms:
    m.reset_running_stats()
    m.momentum = None  # cumulative average
  model.train()
  with torch.no_grad():
    model(inputs)
  model.train(was_training)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in norms:
      m.momentum = 0.1
      m.running_mean.add_(0.05 * torch.randn(m.running_mean.shape, generator=g))
      m.running_var.mul_(torch.exp(0.05 * torch.randn(m.running_var.shape, generator=g)))
  return model
