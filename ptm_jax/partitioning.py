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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axis (or None: replicated). FSDP shards the model width; tensor
# parallelism shards heads, the MLP width, the vocabulary and conv output channels.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('embed_out', None),
    ('position', None),
    ('layers', None),  # the stacked axis of a scanned stack (LayerStack.scan)
    ('classes', None),
    ('conv_in', 'fsdp'),
    ('conv_out', 'tensor'),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; -1 takes the devices left over.

  Axes are AxisType.Auto: shardings are propagated by the compiler (GSPMD) from the parameter
  and batch shardings, so linen code needs no per-op sharding annotations.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f'Only one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices do not split into data={data} fsdp={fsdp} '
                       f'tensor={tensor}: make the fixed axes divide {len(devices)}.')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs '
                     f'{int(np.prod(sizes))} devices but {len(devices)} are present: set one '
                     'axis to -1 or make the product equal the device count.')
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


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
