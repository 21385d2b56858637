"""The one place where Flax linen's logical partitioning meets a device mesh.

Models name their parameter axes (`ptm_jax.models.layers`); LOGICAL_RULES map those names onto
the mesh axes ('data', 'fsdp', 'tensor'); the functions here turn a module into the
NamedShardings of its variables, for `jax.jit(..., out_shardings=...)` or for loading weights
straight into place.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axis (or None: replicated). FSDP shards the model width; tensor
# parallelism shards heads, the MLP width, the vocabulary and conv output channels.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('position', None),
    ('classes', None),
    ('conv_in', 'fsdp'),
    ('conv_out', 'tensor'),
)


def abstract_variables(module: nn.Module, inputs: dict[str, Any] | None = None):
  """Boxed ShapeDtypeStructs of module.init (no memory is allocated)."""
  inputs = module.example_inputs() if inputs is None else inputs
  return jax.eval_shape(lambda rng: module.init(rng, **inputs), jax.random.key(0))


def logical_specs(abstract_boxed) -> Any:
  """PartitionSpecs of logical names, one per variable (unannotated ones replicated)."""
  return nn.get_partition_spec(abstract_boxed)


def variable_shardings(abstract_boxed, mesh: Mesh,
                       rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """NamedShardings for the unboxed variables of `abstract_boxed` on `mesh`.

  A logical axis whose mesh axes do not divide the dimension is replicated instead of failing,
  so one rule set serves every model size.
  """
  specs = logical_specs(abstract_boxed)
  shapes = nn.unbox(abstract_boxed)

  def to_sharding(spec, shape):
    mesh_spec = nn.logical_to_mesh_axes(spec, rules) if spec is not None else PartitionSpec()
    fitted = []
    for dim, axes in zip(shape.shape, tuple(mesh_spec) + (None,) * len(shape.shape)):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      fitted.append(axes if size > 1 and dim % size == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*fitted))

  return jax.tree.map(to_sharding, specs, shapes,
                      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)
