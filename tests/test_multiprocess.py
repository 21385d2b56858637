"""Acceptance tests of multi-process training: two CPU processes joined by jax.distributed train
what one process with all the devices trains, and each gets its own data state back on resume.

This is the multi-host set-up of a cluster, on one machine: two trainer processes, each with 4
CPU devices of its own, find each other through a coordinator at localhost:<port>
(`--coordinator_address --num_processes --process_id`, ptm_jax/train/distributed.py), build one
mesh over all 8 devices and write to one shared workdir. Against them runs one process with 8
devices and the same config. The mesh is FSDP over all 8 devices, so every step crosses the
process boundary: each process loads only the batch rows that its devices hold (8 of each batch
of 16), parameters are split between the processes and gathered for every layer, gradients are
reduce-scattered back, all through JAX's CPU collectives (gloo); and every checkpoint array is
written half by one process, half by the other.

If the processes did not split the batch (both reading the same rows) or did not combine their
gradients, the losses would differ from the single process's from the first step on. They agree
to float32 rounding only, not bit for bit: the single process sums the 8 devices' partial
results in XLA's in-process all-reduce, the two processes in gloo's, in another order, and the
last bit of a float32 sum depends on the order. A relative tolerance of 1e-6 (about 8 units in
the last place) holds with a wide margin over the 12 steps (the largest difference seen, over
30 steps, is one unit in the last place).

The second test runs ptm_jax.train.checkpointing.Checkpointer in two processes without the
trainer (seconds, not a minute), to cover what the trainer test cannot afford to: a
multi-process restore, with a data state that differs between the processes. The third damages
the latest checkpoint for one process only: every process falls back to the same older step.
"""

import json
import os
import socket
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ptm_jax.partitioning import make_mesh
from ptm_jax.train import checkpointing, distributed
from tests.test_fault_tolerance import (SUBPROCESS_TIMEOUT_S, TINY_DIGITS_ARGS, Subprocess,
                                        Trainer, committed_steps, read_metrics, read_state,
                                        read_summary)

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
# Multi-process steps wait on gloo collectives (0.5-1 s a step on 2 busy cores, 10-30x the
# single process), so this run is shorter than test_fault_tolerance's.
TOTAL_STEPS = 12
CHECKPOINT_EVERY = 6
RTOL = 1e-6
# Parameters are O(0.01..1) and agree to RTOL; the absolute tolerance is for the attention key
# bias, which gets no gradient (softmax ignores a shift shared by all keys) and so moves only by
# Adam-normalised rounding noise, about 1e-6 in size and different in each run.
STATE_ATOL = 1e-5
ARGS = (*TINY_DIGITS_ARGS, f'--config.total_steps={TOTAL_STEPS}',
        f'--config.checkpoint_every={CHECKPOINT_EVERY}')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _with_device_count(env: dict[str, str], count: int) -> dict[str, str]:
  """`env` with XLA_FLAGS forcing `count` CPU devices instead of conftest's 8."""
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count=')]
  flags.append(f'--xla_force_host_platform_device_count={count}')
  return dict(env, XLA_FLAGS=' '.join(flags))


def _finish_all(processes: list[Subprocess]) -> None:
  """Waits until every process succeeded; on the first failure or a hang, kills all and fails.

  The survivors of a failed process would wait for it in their next collective, so they are
  killed rather than waited for.
  """
  while True:
    codes = [p.process.poll() for p in processes]
    failed = [code for code in codes if code not in (None, 0)]
    late = time.monotonic() > min(p.deadline for p in processes)
    if failed or late:
      for p in processes:
        p.kill()
      logs = '\n'.join(f'--- {" ".join(p.command)}\n{p.output_tail()}' for p in processes)
      reason = (f'exited with code {failed[0]}' if failed
                else f'ran past {SUBPROCESS_TIMEOUT_S} s and were killed')
      pytest.fail(f'Processes {reason}:\n{logs}')
    if all(code == 0 for code in codes):
      for p in processes:
        p.finish()
      return
    time.sleep(0.1)


def _train_series(workdir) -> dict[str, np.ndarray]:
  """Metric -> its values over steps 1..TOTAL_STEPS; each step must be logged exactly once."""
  records = [r for r in read_metrics(workdir) if r['split'] == 'train']
  # One record per step: only process 0 writes metrics.jsonl (another writer would repeat them).
  assert [r['step'] for r in records] == list(range(1, TOTAL_STEPS + 1))
  return {key: np.array([r[key] for r in records])
          for key in ('loss', 'grad_norm', 'accuracy', 'learning_rate')}


def test_two_processes_train_like_one_process_with_all_devices(tmp_path):
  port = _free_port()
  multi_dir, single_dir = tmp_path / 'two_processes', tmp_path / 'one_process'
  env = dict(os.environ)
  multi_env = _with_device_count(env, DEVICES_PER_PROCESS)
  processes = [
      Trainer(multi_dir, (*ARGS, f'--coordinator_address=localhost:{port}',
                          f'--num_processes={NUM_PROCESSES}', f'--process_id={index}'),
              multi_env, tmp_path / f'process_{index}.log')
      for index in range(NUM_PROCESSES)]
  single = Trainer(single_dir, ARGS, _with_device_count(env, 8), tmp_path / 'single.log')
  _finish_all([*processes, single])

  multi_summary, single_summary = read_summary(multi_dir), read_summary(single_dir)
  for summary in (multi_summary, single_summary):
    assert summary['devices'] == NUM_PROCESSES * DEVICES_PER_PROCESS
    assert summary['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  # The parameters are split alike: per device, the same bytes.
  assert multi_summary['param_bytes_per_device'] == single_summary['param_bytes_per_device']

  multi, single = _train_series(multi_dir), _train_series(single_dir)
  np.testing.assert_array_equal(multi['learning_rate'], single['learning_rate'])
  np.testing.assert_allclose(multi['loss'], single['loss'], rtol=RTOL)
  np.testing.assert_allclose(multi['grad_norm'], single['grad_norm'], rtol=RTOL)
  np.testing.assert_array_equal(multi['accuracy'], single['accuracy'])

  multi_eval, single_eval = multi_summary['eval'], single_summary['eval']
  assert multi_eval['num_examples'] == single_eval['num_examples'] == 359
  assert multi_eval['accuracy'] == single_eval['accuracy']
  np.testing.assert_allclose(multi_eval['loss'], single_eval['loss'], rtol=RTOL)
  assert len([r for r in read_metrics(multi_dir) if r['split'] == 'eval']) == 1

  # Both processes took part in every save, and together wrote whole arrays: the final train
  # state (parameters, Adam moments, step, rng) reads back as the single process's.
  expected_steps = list(range(CHECKPOINT_EVERY, TOTAL_STEPS + 1, CHECKPOINT_EVERY))
  assert committed_steps(multi_dir) == committed_steps(single_dir) == expected_steps
  multi_state = read_state(multi_dir, TOTAL_STEPS)
  single_state = read_state(single_dir, TOTAL_STEPS)
  assert jax.tree.structure(multi_state) == jax.tree.structure(single_state)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(multi_state),
                          jax.tree.leaves(single_state)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=STATE_ATOL,
                               err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------
# Checkpointer across processes, without the trainer: cheap enough to test restore as well.

CHECKPOINT_STEP = 7


def _expected_array() -> np.ndarray:
  return np.arange(8 * 3, dtype=np.float32).reshape(8, 3)


def _checkpoint_worker(directory: str, port: str, process_id: str, result_path: str) -> None:
  """One process of test_each_process_restores_its_own_data_state (run as __main__).

  Saves a sharded array and this process's data state, restores them with a new Checkpointer
  and writes what it got back to result_path as JSON.
  """
  distributed.initialize(f'localhost:{port}', NUM_PROCESSES, int(process_id))
  sharding = NamedSharding(make_mesh(data=-1), PartitionSpec('data'))
  array = jax.make_array_from_callback((8, 3), sharding, lambda index: _expected_array()[index])
  # Each process's own, of its own length: a streamed corpus leaves each host's iterator at its
  # own place.
  data_state = {'process': jax.process_index(), 'position': 10 ** (jax.process_index() + 2)}
  with checkpointing.Checkpointer(directory) as saver:
    saver.save(CHECKPOINT_STEP, {'array': array}, data_state, force=True)
  # A new Checkpointer, as in a resumed run.
  with checkpointing.Checkpointer(directory) as restorer:
    abstract = {'array': jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=sharding)}
    step, state, restored_data_state = restorer.restore(abstract)
  shards_match = all(
      np.array_equal(np.asarray(shard.data), _expected_array()[shard.index])
      for shard in state['array'].addressable_shards)
  with open(result_path, 'w', encoding='utf-8') as f:
    json.dump({'step': step, 'data_state': restored_data_state,
               'local_devices': jax.local_device_count(), 'shards_match': shards_match}, f)


def test_each_process_restores_its_own_data_state(tmp_path):
  port = _free_port()
  directory = tmp_path / 'checkpoints'
  env = _with_device_count(dict(os.environ), DEVICES_PER_PROCESS)
  results = [tmp_path / f'worker_{index}.json' for index in range(NUM_PROCESSES)]
  _finish_all([Subprocess([sys.executable, '-m', 'tests.test_multiprocess',
                           '_checkpoint_worker', str(directory), str(port), str(index),
                           str(results[index])], env,
                          tmp_path / f'worker_{index}.log')
               for index in range(NUM_PROCESSES)])
  for index, path in enumerate(results):
    result = json.loads(path.read_text())
    assert result == {'step': CHECKPOINT_STEP,
                      'data_state': {'process': index, 'position': 10 ** (index + 2)},
                      'local_devices': DEVICES_PER_PROCESS, 'shards_match': True}

  # One process cannot take over the iterators of two.
  sharding = NamedSharding(make_mesh(data=8), PartitionSpec('data'))
  abstract = {'array': jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=sharding)}
  with checkpointing.Checkpointer(directory) as restorer:
    with pytest.raises(ValueError, match='data states of 2 processes but this run has 1'):
      restorer.restore(abstract)


def _damaged_for_one_process_worker(directory: str, port: str, process_id: str,
                                    result_path: str) -> None:
  """One process of test_a_step_damaged_for_one_process_falls_back_on_every_process.

  Saves steps 1 and 2, deletes process 1's array files of step 2 (what a host that cannot read
  its part of a checkpoint sees), restores with a new Checkpointer and writes what it got back.
  """
  distributed.initialize(f'localhost:{port}', NUM_PROCESSES, int(process_id))
  sharding = NamedSharding(make_mesh(data=-1), PartitionSpec('data'))
  # Rows of 4 KiB: OCDBT keeps values of a few bytes inside its b-tree, not in the data files.
  values = np.arange(8 * 1024, dtype=np.float32).reshape(8, 1024)

  def state(step):
    return {'array': jax.make_array_from_callback(values.shape, sharding,
                                                  lambda index: step * values[index])}

  with checkpointing.Checkpointer(directory, save_every=1) as saver:
    for step in (1, 2):
      saver.save(step, state(step), {'step': step, 'process': jax.process_index()})
  if jax.process_index() == 1:
    damaged = _own_array_files(os.path.join(directory, '2'))
    assert damaged, 'no array files of process 1 found to damage'
    for path in damaged:
      os.remove(path)
  multihost_utils.sync_global_devices('step 2 damaged')
  with checkpointing.Checkpointer(directory) as restorer:
    abstract = {'array': jax.ShapeDtypeStruct(values.shape, jnp.float32, sharding=sharding)}
    step, restored, data_state = restorer.restore(abstract)
  shards_match = all(
      np.array_equal(np.asarray(shard.data), step * values[shard.index])
      for shard in restored['array'].addressable_shards)
  with open(result_path, 'w', encoding='utf-8') as f:
    json.dump({'step': step, 'data_state': data_state, 'shards_match': shards_match}, f)


def _own_array_files(step_dir: str) -> list[str]:
  """The tensorstore data files that this process wrote in a step's 'state' item (OCDBT puts
  each process's writes under ocdbt.process_<index>/d/)."""
  own = f'ocdbt.process_{jax.process_index()}'
  return [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
          if os.path.basename(root) == 'd' and own in root.split(os.sep) for name in names]


def test_a_step_damaged_for_one_process_falls_back_on_every_process(tmp_path):
  # Process 1 cannot restore step 2; process 0 can. Each falling back alone would leave the
  # global arrays half step 2, half step 1 (and the processes at different steps): all of them
  # restore step 1.
  port = _free_port()
  env = _with_device_count(dict(os.environ), DEVICES_PER_PROCESS)
  results = [tmp_path / f'worker_{index}.json' for index in range(NUM_PROCESSES)]
  _finish_all([Subprocess([sys.executable, '-m', 'tests.test_multiprocess',
                           '_damaged_for_one_process_worker', str(tmp_path / 'checkpoints'),
                           str(port), str(index), str(results[index])], env,
                          tmp_path / f'worker_{index}.log')
               for index in range(NUM_PROCESSES)])
  for index, path in enumerate(results):
    assert json.loads(path.read_text()) == {
        'step': 1, 'data_state': {'step': 1, 'process': index}, 'shards_match': True}
  assert 'All of them restore step 1' in (tmp_path / 'worker_0.log').read_text()


if __name__ == '__main__':
  globals()[sys.argv[1]](*sys.argv[2:])
