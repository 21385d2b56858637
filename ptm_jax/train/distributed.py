"""Multi-host start-up: one process per host (or per GPU), all running the same command.

`initialize` wraps jax.distributed.initialize. On TPU pods and SLURM/MPI GPU clusters JAX finds
the coordinator by itself (`auto=True`); elsewhere, e.g. several processes on one CPU machine,
give the coordinator's host:port, the process count and this process's index. After it, each
process sees every device in jax.devices() and its own in jax.local_devices(); the trainer's
mesh spans all of them and each process feeds only its rows of every global batch.
"""

import jax


def initialize(coordinator_address: str = '', num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
  """Joins this process to a multi-process run; returns whether it did.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service ('' with auto=True:
      detected from the cluster environment).
    num_processes: how many processes take part (None with auto=True).
    process_id: this process's index, 0..num_processes-1 (None with auto=True).
    auto: let JAX detect the cluster (TPU pod, SLURM, Open MPI).
  """
  if not coordinator_address and not auto:
    if (num_processes or 1) > 1 or (process_id or 0) > 0:
      raise ValueError('--num_processes and --process_id need --coordinator_address (host:port '
                       'of process 0) or --distributed; without either, each process would '
                       'train alone as process 0, writing the same workdir.')
    return False
  if coordinator_address and (num_processes is None or process_id is None):
    raise ValueError('A multi-process run with --coordinator_address also needs '
                     '--num_processes and --process_id (this process\'s index, from 0).')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} is outside 0..{num_processes - 1}.')
  jax.distributed.initialize(coordinator_address or None, num_processes, process_id)
  return True
