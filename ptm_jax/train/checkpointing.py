"""Saving and resuming a training run: sharded train state + data-iterator state, with orbax.

A checkpoint step directory holds two orbax items:
  'state'  the train-state pytree of jax.Arrays (params, optimizer state, step, rng), written by
           every process for its own shards (orbax's pytree format, OCDBT + zarr);
  'data'   a small JSON dict, e.g. the data iterator's state, so that a resumed run continues with
           the next unseen batch instead of replaying the epoch (JsonSave). orbax writes it from
           process 0 alone, but in a multi-process run each process's iterator is at its own
           place (a streamed corpus gives each host its own documents and packing buffer), so
           there the item holds every process's data state and each process restores its own.

Saves are asynchronous: `save` copies the arrays to host memory and returns; a background thread
writes them to `<dir>/<step>.orbax-checkpoint-tmp` and renames that to `<dir>/<step>` on commit. A
kill -9 mid-save therefore leaves only the tmp directory, which orbax never lists as a step (and
which the next `Checkpointer` on the directory deletes). `wait()` blocks until the save is durable.

Restoring takes an abstract state (ShapeDtypeStructs with shardings), so every array is read
straight into its shards on the current mesh, whatever mesh the checkpoint was written from
(saved over 1x8 data parallelism, restored onto 2x4 data x tensor or FSDP). If the latest step
does not restore (files truncated or deleted after commit), `restore` logs a warning naming the
step and the error and falls back to the next older step. In a multi-process run each process
reads its own shards, so a step may fail for some processes only; the processes then agree on
the oldest step any of them fell back to, and all restore that one.

Preemption (single process): `install_sigterm_handler` turns SIGTERM into a flag that the train
loop polls through `reached_preemption(step)`, then saves with force=True, waits and exits. In a
multi-process run JAX's preemption service owns SIGTERM and agrees on one step for all processes;
`reached_preemption` asks it through orbax (see that method).

`check_workdir` guards a run directory against resuming checkpoints of a different config.
"""

import json
import logging
import signal
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

STATE_ITEM = 'state'
DATA_ITEM = 'data'
CONFIG_FILE = 'config.json'
# What a start writes to its workdir before its first log or checkpoint, all of it from the
# config: config.json (and its tmp file, where killed writing it), and the tokenizer that
# experiments/train.py saves before it builds the model (a text task's start that fails in the
# model or its compilation leaves it).
START_UP_FILES = (CONFIG_FILE, f'{CONFIG_FILE}.tmp', 'tokenizer.json')
# Config keys a resumed run may change: how long to train and how often to log, evaluate, save.
DEFAULT_ALLOWED_TO_DIFFER = ('total_steps', 'log_every', 'eval_every', 'checkpoint_every')
# How many differing config keys the check_workdir error shows.
_SHOWN_DIFFERENCES = 5
# The key of the data item of a multi-process checkpoint: the list of every process's data state.
PER_PROCESS_DATA_KEY = 'per_process_data_states'


def _as_path(directory) -> epath.Path:
  """An absolute epath.Path (orbax wants absolute paths; 'gs://...' is kept as is)."""
  path = epath.Path(directory)
  return path if '://' in str(directory) else path.absolute()


def _abstract_leaf(leaf) -> jax.ShapeDtypeStruct:
  """A ShapeDtypeStruct with the leaf's sharding; the sharding is required."""
  sharding = getattr(leaf, 'sharding', None)
  if not isinstance(sharding, jax.sharding.Sharding):
    raise ValueError(
        f'restore needs a sharding on every leaf of abstract_state, but a leaf of shape '
        f'{getattr(leaf, "shape", None)} has sharding={sharding!r}: build it as '
        'jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)), e.g. from '
        'jax.eval_shape of the init function with the shardings of '
        'ptm_jax.partitioning.variable_shardings.')
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _all_processes_data_states(data_state: Mapping[str, Any] | None) -> dict[str, list]:
  """{PER_PROCESS_DATA_KEY: [data state of process 0, of process 1, ...]}.

  A collective: every process calls it with its own JSON-able state. The states travel as UTF-8
  JSON bytes, zero-padded to a power of two so that a state's length changing by a digit between
  saves does not compile a new all-gather.
  """
  encoded = np.frombuffer(json.dumps(data_state).encode('utf-8'), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(encoded.size))).reshape(-1)
  padded = np.zeros(1 << int(lengths.max() - 1).bit_length(), np.uint8)
  padded[:encoded.size] = encoded
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # (processes, padded length)
  return {PER_PROCESS_DATA_KEY: [json.loads(row[:length].tobytes().decode('utf-8'))
                                 for row, length in zip(gathered, lengths)]}


def _own_data_state(data_state: Any) -> Any:
  """This process's data state out of a restored data item (the item itself if one process
  saved it)."""
  if not (isinstance(data_state, dict) and set(data_state) == {PER_PROCESS_DATA_KEY}):
    return data_state
  states = data_state[PER_PROCESS_DATA_KEY]
  if len(states) != jax.process_count():
    raise ValueError(f'The checkpoint holds the data states of {len(states)} processes but this '
                     f'run has {jax.process_count()}: each process resumes its own data iterator, '
                     f'so resume with {len(states)} processes.')
  return states[jax.process_index()]


def _state_handler() -> 'ocp.PyTreeCheckpointHandler':
  """orbax's pytree handler (the format StandardSave writes) with replica-parallel writes only
  across processes.

  Replica-parallel saving splits each replicated array between its replicas so that every host
  writes a part; within one process it only costs an eagerly compiled slice per array shape
  (128 compilations, 5.5 s, for a ResNet-18's state on 8 CPU devices).
  """
  array_handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)
  registry = ocp.type_handlers.create_type_handler_registry((jax.Array, array_handler))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
  """Asynchronous orbax checkpoints of (train state, data state) in one directory.

  Usage in a train loop:

    ckpt = Checkpointer(workdir / 'checkpoints', keep=3, save_every=1000)
    ckpt.install_sigterm_handler()
    restored = ckpt.restore(abstract_state)      # None on a fresh run
    for step in range(start, total_steps + 1):
      state = train_step(state, next(batches))
      ckpt.save(step, state, data_iterator_state)
      if ckpt.reached_preemption(step):
        ckpt.save(step, state, data_iterator_state, force=True)
        break
    ckpt.close()                                 # waits for the last save

  A save returns once the arrays are copied to host memory, so the caller may donate or
  overwrite the state's buffers in the next step.
  """

  def __init__(self, directory, *, keep: int | None = 3, save_every: int = 0,
               async_save: bool = True):
    """Opens (and creates) the checkpoint directory.

    Args:
      directory: where the step directories go (local path or 'gs://...').
      keep: how many of the latest steps to keep; None keeps all.
      save_every: `save` writes when step % save_every == 0; 0: only saves with force=True.
      async_save: write in a background thread (False: `save` blocks until durable).
    """
    if keep is not None and keep < 1:
      raise ValueError(f'keep={keep} must be >= 1 (or None to keep every checkpoint).')
    if save_every < 0:
      raise ValueError(f'save_every={save_every} must be >= 0 (0: only forced saves).')
    self.directory = _as_path(directory)
    self.save_every = save_every
    self.preempted = False
    # Steps that hold this run's trajectory: the ones it saved and the one it restored. Another
    # existing step that the run saves comes from an earlier run that this one has rolled back
    # past (an unrestorable or abandoned step), and `save` replaces it instead of failing with
    # orbax's StepAlreadyExistsError.
    self._own_steps: set[int] = set()
    self._sigterm_handler_installed = False
    self._previous_sigterm_handler = None
    self._reported_preemption = False
    self._remove_uncommitted_saves()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE_ITEM: _state_handler(), DATA_ITEM: ocp.JsonCheckpointHandler()})

  def _remove_uncommitted_saves(self) -> None:
    """Deletes the tmp directories of saves killed before their commit.

    orbax never lists them as steps, but they hold up to a whole checkpoint of disk. (orbax's own
    cleanup_tmp_directories option runs in a background thread that close() does not wait for.)
    """
    if jax.process_index() == 0:
      for tmp_path in ocp.path.step.all_temporary_paths(self.directory):
        logger.warning('Deleting %s: a save that was killed before it committed.', tmp_path.get())
        tmp_path.get().rmtree()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'Checkpointer cleanup {self.directory}')

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def save(self, step: int, state: Any, data_state: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Starts saving `state` and `data_state` as `step` if it is due (or force); returns whether.

    Asynchronous: returns once the arrays are on the host; `wait()` makes the save durable. A
    step this object already saved or restored is not saved again (returns False).

    In a multi-process run every process calls it, each with its own data_state; `restore`
    gives each process back its own.

    Args:
      step: the train step the state is after (the directory name).
      state: pytree of jax.Arrays, sharded in any way.
      data_state: JSON-able dict (e.g. the data iterator's state) or None.
      force: save even if step is not a multiple of save_every.
    """
    due = force or (self.save_every > 0 and step % self.save_every == 0)
    if not due or step in self._own_steps:
      return False
    if jax.process_count() > 1:
      data_state = _all_processes_data_states(data_state)
    if step in self._manager.all_steps():
      logger.warning('Replacing checkpoint step %d in %s: it was written by an earlier run that '
                     'this run has rolled back past.', step, self.directory)
      self._manager.wait_until_finished()
      self._manager.delete(step)
    saved = self._manager.save(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeSave(state),
                                         DATA_ITEM: ocp.args.JsonSave(data_state)}),
        force=True)
    if saved:
      self._own_steps.add(step)
    return saved

  def wait(self) -> None:
    """Blocks until the pending save (if any) is committed to its step directory."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the pending save, releases orbax's threads and puts back the SIGTERM handler."""
    self.remove_sigterm_handler()
    self._manager.wait_until_finished()
    self._manager.close()

  def latest_step(self) -> int | None:
    """The newest step (including one whose asynchronous save is still running), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Committed and in-flight steps, oldest first."""
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[int, Any, Any] | None:
    """Reads a checkpoint onto the shardings of `abstract_state`.

    Args:
      abstract_state: the state's pytree structure with jax.ShapeDtypeStruct (or jax.Array)
        leaves that carry `.sharding` (e.g. NamedSharding on the current mesh); each array is
        read straight into those shards, whatever sharding it was saved with.
      step: the step to read; None: the latest step that restores, falling back past ones that
        fail (each failure logged as a warning); in a multi-process run, the latest that
        restores on every process (a collective then).

    Returns:
      (step, state, data_state), or None if the directory holds no checkpoint. data_state is
      the one this process saved.

    Raises:
      FileNotFoundError: `step` was given and has no checkpoint.
      RuntimeError: no step restores (the message lists each step and its error), or some
        processes find no checkpoint that restores while others do.
      ValueError: the checkpoint was saved by another number of processes than this run has
        (each process's data state has no process to go to).
    """
    abstract_state = jax.tree.map(_abstract_leaf, abstract_state)
    # A save in flight is not yet readable; let it commit first.
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f'No checkpoint of step {step} in {self.directory}; it holds '
                                f'steps {steps}.')
      state, data_state = self._restore_step(abstract_state, step)
      self._own_steps.add(step)
      return step, state, _own_data_state(data_state)
    failures = []
    found = None  # (step, state, data_state) of the newest step that restores here
    for candidate in reversed(steps):
      try:
        state, data_state = self._restore_step(abstract_state, candidate)
      except Exception as e:  # pylint: disable=broad-except
        # Any failure (missing or truncated files, bad JSON) makes the step unusable; an older
        # one may still be whole. The final error lists every failure, so a mismatch between
        # abstract_state and the checkpoints (which fails every step) is not hidden.
        logger.warning('Checkpoint step %d in %s does not restore (%s: %s); trying the previous '
                       'step.', candidate, self.directory, type(e).__name__, e)
        failures.append((candidate, e))
        continue
      found = candidate, state, data_state
      break
    if jax.process_count() > 1:
      found = self._agreed_across_processes(abstract_state, found, bool(failures))
    if found is None:
      if not failures:
        return None
      tried = '\n'.join(f'  step {failed}: {type(e).__name__}: {e}' for failed, e in failures)
      raise RuntimeError(f'None of the checkpoints in {self.directory} restores onto '
                         f'abstract_state:\n{tried}\nCheck that abstract_state has the structure, '
                         'shapes and dtypes of the saved state.') from failures[-1][1]
    step, state, data_state = found
    self._own_steps.add(step)
    if failures:
      logger.warning('Restored checkpoint step %d after newer steps %s failed.', step,
                     [failed for failed, _ in failures])
    return step, state, _own_data_state(data_state)

  def _agreed_across_processes(self, abstract_state: Any, found: tuple | None,
                               failed: bool) -> tuple | None:
    """This process's `found` (step, state, data_state), or the step that every process restores
    where they found different ones. A collective.

    Each process reads only its own shards, so a step damaged in one process's files (or
    unreadable from one host) fails there alone: that process falls back while the others
    restore the newer step, and trained on, the global arrays would mix two steps. (orbax's
    restore ends in a barrier of one name whatever the step, so such processes come out of their
    restores together, each with its own step.) Here they compare and all restore the oldest
    step found, every process again, so that orbax's barriers pair up.
    """
    no_checkpoint, none_restores = -2, -1
    own = found[0] if found is not None else none_restores if failed else no_checkpoint
    steps = [int(s) for s in np.asarray(
        multihost_utils.process_allgather(np.int32(own))).reshape(-1)]
    if len(set(steps)) == 1:
      return found
    by_process = ', '.join(
        f'process {i}: ' + {no_checkpoint: 'no checkpoint', none_restores: 'none restores'}.get(
            s, f'step {s}') for i, s in enumerate(steps))
    if min(steps) < 0:
      raise RuntimeError(
          f'The processes find different checkpoints in {self.directory} ({by_process}): a '
          'process that finds none sees another directory than the others, or damaged files. '
          'Give every process the same shared directory.')
    agreed = min(steps)
    logger.warning('The processes restored different checkpoint steps from %s (%s): a step that '
                   'restores for some processes only. All of them restore step %d.',
                   self.directory, by_process, agreed)
    state, data_state = self._restore_step(abstract_state, agreed)
    return agreed, state, data_state

  def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, Any]:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeRestore(
                abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
            DATA_ITEM: ocp.args.JsonRestore()}))
    return restored[STATE_ITEM], restored[DATA_ITEM]

  def install_sigterm_handler(self) -> None:
    """Makes SIGTERM set `self.preempted` instead of killing the process (single process).

    Call from the main thread. The previous handler comes back with `remove_sigterm_handler` or
    `close`. In a multi-process run nothing is installed: JAX's preemption service (on by
    default with jax.distributed) owns SIGTERM there, and a Python handler would replace it.
    """
    if jax.process_count() > 1:
      logger.info('Multi-process run: SIGTERM is left to the JAX preemption service; '
                  'reached_preemption() asks it.')
      return
    if self._sigterm_handler_installed:
      return

    def on_sigterm(signum, frame):  # pylint: disable=unused-argument
      # Only set the flag: the train loop saves at its next step boundary, where the state is
      # consistent. (reached_preemption logs it.)
      self.preempted = True

    try:
      self._previous_sigterm_handler = signal.signal(signal.SIGTERM, on_sigterm)
      self._sigterm_handler_installed = True
    except ValueError as e:
      raise ValueError('install_sigterm_handler must be called from the main thread '
                       f'({e}).') from e

  def remove_sigterm_handler(self) -> None:
    """Puts back the SIGTERM handler that `install_sigterm_handler` replaced (if it did)."""
    if self._sigterm_handler_installed:
      # None: the previous handler was not set from Python and cannot be put back; the default
      # (terminate) is the closest.
      previous = self._previous_sigterm_handler
      signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
      self._sigterm_handler_installed = False
      self._previous_sigterm_handler = None

  def reached_preemption(self, step: int) -> bool:
    """Whether the train loop should save now and exit because the job is being preempted.

    True when this process received SIGTERM (the flag of `install_sigterm_handler`) or when
    orbax's `CheckpointManager.reached_preemption(step)` says so: in a multi-process run with
    the JAX preemption service that is JAX's preemption sync point, a step that every process
    reaches, so they all save the same step together (call this every step on every process);
    without jax.distributed it is always False. Do not rely on the local flag alone across
    processes: each would see SIGTERM at a different step and the collective save would hang.
    """
    reached = self.preempted or self._manager.reached_preemption(step)
    if reached and not self._reported_preemption:
      logger.warning('Preemption at step %d: saving a checkpoint and stopping.', step)
      self._reported_preemption = True
    return reached


def _flatten(config: Any, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
  if not isinstance(config, dict):
    return {prefix: config}
  flat = {}
  for key, value in config.items():
    path = f'{prefix}.{key}' if prefix else str(key)
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, path))
    else:
      flat[path] = value
  return flat


def _config_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                        allowed_to_differ: Sequence[str]) -> list[tuple[str, Any, Any]]:
  """(key path, old value, new value) of each difference not allowed, sorted by path."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  missing = '<absent>'

  def allowed(path: str) -> bool:
    # A listed key allows everything under it ('profile' allows 'profile.num_steps'), both as a
    # dotted path from the top and as a key name at any depth.
    parts = path.split('.')
    dotted = ['.'.join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p in allowed_to_differ for p in parts + dotted)

  return [(path, old_flat.get(path, missing), new_flat.get(path, missing))
          for path in sorted(set(old_flat) | set(new_flat))
          if not allowed(path) and old_flat.get(path, missing) != new_flat.get(path, missing)]


def _clear_directory(path: epath.Path) -> None:
  for child in path.iterdir():
    if child.is_dir():
      child.rmtree()
    else:
      child.unlink()


def check_workdir(workdir, config_json: str, overwrite: bool = False,
                  allowed_to_differ: Sequence[str] = DEFAULT_ALLOWED_TO_DIFFER) -> bool:
  """Makes `workdir` a run directory of this config; refuses to mix runs of different configs.

  A workdir holding a config.json of the same config (ignoring the keys in allowed_to_differ) is
  a run to resume. One of a different config raises, unless overwrite=True: then its contents
  (checkpoints, logs, config.json) are deleted. overwrite does nothing when the configs match,
  so a preempted job restarted with the same command line (--overwrite included) resumes
  instead of wiping its own progress. A workdir that holds nothing but START_UP_FILES
  (config.json, tokenizer.json) and empty folders, the trace of a start that failed before
  logging, takes the new config without overwrite (and loses those files). config.json is then
  (re)written with `config_json`.

  Call it on every process before creating the Checkpointer: every process compares; process 0
  alone deletes and writes, and the others wait for it.

  Args:
    workdir: the run directory (created if missing).
    config_json: the run's config as a JSON object.
    overwrite: delete the contents of a workdir that holds a different config (or files but no
      config.json, or a config.json that is not valid JSON).
    allowed_to_differ: key names (matching at any depth) or dotted key paths ('train.lr') whose
      values may change between the run and its resumption; a key that holds a section allows
      every key under it ('profile': 'profile.num_steps').

  Returns:
    True if the workdir holds a run of this config to resume, False if it starts fresh.

  Raises:
    ValueError: config_json is not a JSON object, or the workdir holds another config (or
      unrelated files, or a damaged config.json) and overwrite is False.
  """
  try:
    config = json.loads(config_json)
  except ValueError as e:
    raise ValueError(f'config_json is not valid JSON ({e}).') from e
  if not isinstance(config, dict):
    raise ValueError(f'config_json must be a JSON object, got {type(config).__name__}.')
  workdir = _as_path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f'The workdir {workdir} is a file, not a directory: give the workdir a new '
                     'directory, or the directory of the run to resume.')
  config_path = workdir / CONFIG_FILE
  fix = 'Pass --overwrite to delete it and start afresh, or use a new workdir.'
  clear = False
  no_progress = False
  if config_path.exists():
    try:
      old_config = json.loads(config_path.read_text())
    except ValueError as e:
      if not overwrite:
        raise ValueError(f'{config_path} is not valid JSON ({e}). {fix}') from e
      old_config = None
    # An unreadable config.json is not this run's: overwrite clears the workdir.
    differences = (True if old_config is None
                   else _config_differences(old_config, config, allowed_to_differ))
    # A start that failed before its first log or checkpoint (a bad model name, say) leaves
    # START_UP_FILES alone: nothing to lose, so the corrected command starts afresh.
    no_progress = old_config is not None and all(
        p.name in START_UP_FILES or (p.is_dir() and not any(p.iterdir()))
        for p in workdir.iterdir())
    if differences and no_progress:
      logger.info('%s holds only the start-up files of a run that never logged: starting afresh.',
                  workdir)
    elif differences and not overwrite:
      shown = '\n'.join(f'  {path}: {old!r} (in {workdir}) -> {new!r} (now)'
                        for path, old, new in differences[:_SHOWN_DIFFERENCES])
      more = len(differences) - _SHOWN_DIFFERENCES
      shown += f'\n  ... and {more} more' if more > 0 else ''
      raise ValueError(f'{workdir} holds a run of a different config ({len(differences)} keys '
                       f'differ):\n{shown}\n{fix}')
    clear = bool(differences)
  elif workdir.exists() and any(workdir.iterdir()):
    if not overwrite:
      raise ValueError(f'{workdir} holds files but no {CONFIG_FILE}, so it is not a run of this '
                       f'config. {fix}')
    clear = True
  resume = config_path.exists() and not clear
  if jax.process_count() > 1:
    # Every process has read the old config before process 0 changes it.
    multihost_utils.sync_global_devices(f'check_workdir read {workdir}')
  if jax.process_index() == 0:
    if clear:
      if not no_progress:
        logger.warning('Overwriting %s: deleting the previous run in it.', workdir)
      # (After a start without progress: its start-up files, which the new config replaces.)
      _clear_directory(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Write then rename, so that a kill mid-write never leaves a truncated config.json.
    tmp_path = workdir / f'{CONFIG_FILE}.tmp'
    tmp_path.write_text(config_json)
    tmp_path.replace(config_path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'check_workdir written {workdir}')
  return resume
