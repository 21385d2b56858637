"""Device peaks and model FLOPs utilisation (MFU), for the trainer's logs and the benchmarks.

MFU = model FLOPs per step / (step seconds x devices x the device's dense bf16 peak).
Model FLOPs are what the model needs, not what runs: 3 x the forward pass's FLOPs (the backward
pass costs about twice the forward), with the forward counted by XLA's cost analysis of the
unpartitioned program, so recomputation from remat, padding of shards and the optimizer are not
counted. Attention is counted in full (T x T), with no discount for causal masks.
"""

import jax

# Dense (not sparse) bf16 peak FLOP/s per device, by a substring of jax's device_kind; the first
# match wins, so a variant comes before the name it contains (the PCIe and NVL cards before the
# SXM's 'H100'/'H200', 'L40S' and 'L40' before 'L4', v5e's 'TPU v5 lite' before 'TPU v5', which
# is the v5p's device_kind). Sources: NVIDIA's H100/H200/A100/L4/L40(S) data sheets, Google
# Cloud's TPU pages.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ('H200 NVL', 835e12),
    ('H200', 989e12),
    ('H100 PCIe', 756e12),
    ('H100 NVL', 835e12),
    ('H100', 989e12),
    ('A100', 312e12),
    ('L40S', 362.05e12),
    ('L40', 181.05e12),
    ('L4', 121e12),
    ('TPU v6', 918e12),
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5e', 197e12),
    ('TPU v5', 459e12),  # v5p: jax's device_kind is 'TPU v5'
    ('TPU v4', 275e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
  """The device's dense bf16 peak FLOP/s, or None where unknown (CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  for key, peak in PEAK_BF16_FLOPS:
    if key in kind:
      return peak
  return None


def flops_of(lowered: jax.stages.Lowered) -> float | None:
  """FLOPs of a lowered (not yet compiled, so unpartitioned: global) computation."""
  flops = (lowered.cost_analysis() or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def mfu(model_flops_per_step: float | None, seconds_per_step: float, num_devices: int,
        device: jax.Device | None = None) -> float | None:
  """Model FLOPs utilisation in [0, 1], or None when the FLOPs or the peak are unknown."""
  peak = peak_flops(device)
  if not model_flops_per_step or peak is None or seconds_per_step <= 0:
    return None
  return model_flops_per_step / (seconds_per_step * num_devices * peak)
