"""Elastic weight consolidation (Kirkpatrick et al., 2017) against catastrophic forgetting.

  L(theta) = L_target(theta) + weight / 2 * sum_i F_i (theta_i - theta*_i)^2

theta* are the parameters after the source task (where adaptation starts) and F the diagonal of
the empirical Fisher information there: the mean over source examples of each example's squared
gradient of its own loss (per-example, not the square of a batch gradient, which would shrink by
the batch size). Parameters with a large F mattered for the source task and are held near
theta*.
"""

from typing import Callable, Iterable

import jax
import jax.numpy as jnp


def fisher_diagonal(loss_fn: Callable, params, batches: Iterable[dict]):
  """Mean over every example of `batches` of (d loss(example) / d params)^2.

  loss_fn(params, batch) -> the scalar loss of a batch (here always a batch of one example).
  batches: dicts of arrays with a leading batch axis. Returns a tree shaped like `params`.
  """
  def example_loss(params, example):  # the example as a batch of one
    return loss_fn(params, jax.tree.map(lambda x: x[None], example))

  def per_example_squares(params, batch):
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0), grads)

  step = jax.jit(per_example_squares)
  total, count = None, 0
  for batch in batches:
    squares = step(params, batch)
    total = squares if total is None else jax.tree.map(jnp.add, total, squares)
    count += int(jax.tree.leaves(batch)[0].shape[0])
  if not count:
    raise ValueError('fisher_diagonal got no batch: give the source task some data '
                     '(config.adapt.source) or fewer config.adapt.ewc.fisher_batches.')
  # A loss that scores an example against the others of its batch (CLIP's contrastive loss: a
  # batch of one is its own only candidate, loss log 1 = 0) has no gradient for one example
  # alone: F = 0 everywhere, and the penalty would hold nothing, silently.
  if not any(bool(jnp.any(t != 0)) for t in jax.tree.leaves(total)):
    raise ValueError('Every per-example gradient of the source loss is zero, so EWC would hold '
                     'no parameter: the loss of a single example does not depend on the '
                     'parameters (a contrastive loss needs its in-batch negatives). Use '
                     'config.adapt.rehearsal for this objective instead of EWC.')
  return jax.tree.map(lambda t: t / count, total)


def penalty(params, anchor, fisher) -> jax.Array:
  """sum_i F_i (theta_i - theta*_i)^2 over every leaf (without the weight / 2)."""
  terms = jax.tree.map(
      lambda p, a, f: jnp.sum(f * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))),
      params, anchor, fisher)
  return sum(jax.tree.leaves(terms), jnp.float32(0.0))
