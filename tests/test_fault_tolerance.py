"""Acceptance tests of experiments/train.py's fault tolerance, run as the real command line.

A training job dies in two ways: kill -9 (host lost, out of memory) at any instant, and SIGTERM
(preemption) with a grace period. Either way the same command, started again, must continue the
run as if nothing happened: the resumed run restores the train state and the data iterator of
the last checkpoint, re-does (and re-logs) the steps after it, and from there every logged
train loss, the final parameters and the final evaluation equal those of a run that was never
interrupted. On CPU the computation is deterministic, so "equal" is bit-for-bit.

The trainer runs as a subprocess (as a job scheduler would run it), on the 8 CPU devices that
tests/conftest.py puts in XLA_FLAGS, so train state and batches are really sharded. The
subprocesses share a persistent XLA compilation cache, so only the first compilation of each
program costs time; each test starts the uninterrupted run once its own run has compiled. The
helpers here are shared with tests/test_multiprocess.py.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 30
CHECKPOINT_EVERY = 10
# The README's digits ViT, made tiny (9.6k parameters) so that a step takes milliseconds: the
# test is about the engine, not the model. Every step is logged, none evaluated until the end.
# FSDP over all 8 devices: the batch is split 8 ways and so is every parameter and optimizer
# state array wider than 8, so each checkpoint is written, and restored, as 8 distinct shards.
TINY_DIGITS_ARGS = (
    '--config=configs/digits.py:runlocal', '--config.log_every=1', '--config.eval_every=0',
    '--config.batch_size=16', '--config.mesh.data=1', '--config.mesh.fsdp=8',
    '--config.model.hidden_size=32', '--config.model.num_layers=1',
    '--config.model.num_heads=2', '--config.model.intermediate_size=64')
TRAIN_ARGS = (*TINY_DIGITS_ARGS, f'--config.total_steps={TOTAL_STEPS}')
# Logged values that are functions of the train state and the batch (unlike steps_per_sec).
DETERMINISTIC_METRICS = ('loss', 'grad_norm', 'accuracy', 'learning_rate')
# Seconds that a trainer subprocess may run before the test kills it and fails: a hang (a
# deadlocked save, a collective waiting for a dead peer) must fail CI, not block it.
SUBPROCESS_TIMEOUT_S = 300
POLL_S = 0.01


# ------------------------------------------------------------------------------------------------
# Helpers: the trainer as a subprocess and what it leaves in its workdir.


@pytest.fixture(scope='session')
def trainer_env(tmp_path_factory) -> dict[str, str]:
  """The environment of trainer subprocesses: this one plus a compilation cache they share."""
  cache_dir = tmp_path_factory.getbasetemp() / 'xla_compilation_cache'
  cache_dir.mkdir(exist_ok=True)
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


class Subprocess:
  """A command run by the test, output to `log_path`, killed if it outlives its deadline."""

  def __init__(self, command: Sequence[str], env: dict[str, str], log_path: pathlib.Path):
    self.command = list(command)
    self.log_path = log_path
    self._log = open(log_path, 'ab')  # appended to: a restarted command logs after the first
    self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=env, stdout=self._log,
                                    stderr=subprocess.STDOUT)
    self.deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S

  def output_tail(self, chars: int = 4000) -> str:
    return self.log_path.read_text(errors='replace')[-chars:]

  def check_alive(self) -> None:
    """Fails the test if the process has exited or outlived its deadline."""
    if self.process.poll() is not None:
      pytest.fail(f'The command exited with code {self.process.returncode} while the test '
                  f'waited on it:\n{" ".join(self.command)}\n{self.output_tail()}')
    if time.monotonic() > self.deadline:
      self.kill()
      pytest.fail(f'The command ran past {SUBPROCESS_TIMEOUT_S} s and was killed:\n'
                  f'{" ".join(self.command)}\n{self.output_tail()}')

  def wait(self) -> int:
    """Waits for the exit (killing the process at the deadline); returns the exit code."""
    try:
      returncode = self.process.wait(timeout=max(self.deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'The command ran past {SUBPROCESS_TIMEOUT_S} s and was killed:\n'
                  f'{" ".join(self.command)}\n{self.output_tail()}')
    self._log.close()
    return returncode

  def finish(self) -> None:
    """Waits for the exit and fails the test unless it succeeded."""
    returncode = self.wait()
    assert returncode == 0, (f'The command failed with code {returncode}:\n'
                             f'{" ".join(self.command)}\n{self.output_tail()}')

  def kill(self) -> None:
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()
    self._log.close()


class Trainer(Subprocess):
  """`python -m experiments.train --workdir=WORKDIR ARGS...` as a subprocess."""

  def __init__(self, workdir: pathlib.Path, args: Sequence[str], env: dict[str, str],
               log_path: pathlib.Path):
    self.workdir = workdir
    super().__init__([sys.executable, '-m', 'experiments.train', f'--workdir={workdir}', *args],
                     env, log_path)


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  """The records of workdir/metrics.jsonl, in order (a line still being written is left out)."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines(keepends=True):
    if line.endswith('\n'):
      records.append(json.loads(line))
  return records


def train_records(records: list[dict]) -> dict[int, dict]:
  """Step -> the train record of that step."""
  return {r['step']: r for r in records if r['split'] == 'train'}


def committed_steps(workdir: pathlib.Path) -> list[int]:
  """Checkpoint steps whose save committed (orbax renames a finished save to its step)."""
  directory = workdir / 'checkpoints'
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def read_state(workdir: pathlib.Path, step: int):
  """The train state of checkpoint `step` as a pytree of numpy arrays (no mesh needed)."""
  path = workdir / 'checkpoints' / str(step) / 'state'
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, restore_args=as_numpy)


def read_summary(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / 'summary.json').read_text())


def wait_for_train_step(trainer: Trainer, step: int, need_checkpoint: bool) -> None:
  """Returns once the trainer has logged train step >= `step` (and committed a checkpoint)."""
  while True:
    trainer.check_alive()
    logged = train_records(read_metrics(trainer.workdir))
    if logged and max(logged) >= step and (committed_steps(trainer.workdir)
                                           or not need_checkpoint):
      return
    time.sleep(POLL_S)


def assert_same_train_metrics(resumed: dict[int, dict], reference: dict[int, dict]) -> None:
  """Every step's deterministic train metrics are bit-for-bit those of the reference run."""
  assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
  assert sorted(reference) == list(range(1, TOTAL_STEPS + 1))
  for step in sorted(reference):
    # Every record holds them all: a renamed or dropped metric fails here, not silently.
    assert set(DETERMINISTIC_METRICS) <= set(reference[step]), (step, sorted(reference[step]))
    for key in DETERMINISTIC_METRICS:
      assert resumed[step][key] == reference[step][key], (
          f'step {step}: {key} {resumed[step][key]!r} after resumption, '
          f'{reference[step][key]!r} uninterrupted')


def assert_same_final_state(workdir: pathlib.Path, reference_workdir: pathlib.Path) -> None:
  resumed = read_state(workdir, TOTAL_STEPS)
  reference = read_state(reference_workdir, TOTAL_STEPS)
  assert jax.tree.structure(resumed) == jax.tree.structure(reference)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(resumed),
                          jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert int(resumed['step']) == TOTAL_STEPS


# ------------------------------------------------------------------------------------------------
# The uninterrupted run, shared by the tests and run alongside their interrupted runs.


class ReferenceRun:
  """The uninterrupted run, started on demand; `workdir()` waits for its end.

  A test starts it once its own run has logged a step, so that it finds every program in the
  compilation cache instead of compiling the same ones at the same time on the same cores.
  """

  def __init__(self, workdir: pathlib.Path, env: dict[str, str]):
    self._workdir = workdir
    self._env = env
    self._trainer = None
    self._finished = False

  def start(self) -> None:
    if self._trainer is None:
      args = (*TRAIN_ARGS, f'--config.checkpoint_every={CHECKPOINT_EVERY}')
      self._trainer = Trainer(self._workdir, args, self._env,
                              self._workdir.parent / 'uninterrupted.log')

  def workdir(self) -> pathlib.Path:
    self.start()
    if not self._finished:
      self._trainer.finish()
      self._finished = True
    return self._workdir

  def kill(self) -> None:
    if self._trainer is not None:
      self._trainer.kill()


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, trainer_env):
  run = ReferenceRun(tmp_path_factory.mktemp('uninterrupted') / 'run', trainer_env)
  yield run
  run.kill()


def test_kill9_then_resume_logs_the_uninterrupted_losses(tmp_path, trainer_env, reference_run):
  # A step after the first checkpoint and early enough that the run is still going when the
  # signal lands (the trainer runs on while the test polls).
  kill_step = random.Random(20260).randint(CHECKPOINT_EVERY + 1, TOTAL_STEPS - 8)
  args = (*TRAIN_ARGS, f'--config.checkpoint_every={CHECKPOINT_EVERY}')
  workdir, log_path = tmp_path / 'run', tmp_path / 'trainer.log'
  killed = Trainer(workdir, args, trainer_env, log_path)
  wait_for_train_step(killed, 1, need_checkpoint=False)
  reference_run.start()
  wait_for_train_step(killed, kill_step, need_checkpoint=True)
  killed.process.send_signal(signal.SIGKILL)
  assert killed.wait() == -signal.SIGKILL
  assert not (workdir / 'summary.json').exists(), 'the run finished before the kill'
  records_before = read_metrics(workdir)
  killed_at = max(train_records(records_before))
  restorable = committed_steps(workdir)
  assert restorable and max(restorable) <= killed_at
  # A kill mid-write leaves a line cut short, which the resumed run must not continue.
  with open(workdir / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 9')

  resumed = Trainer(workdir, args, trainer_env, log_path)  # the same command again
  resumed.finish()
  records_after = read_metrics(workdir)
  kept = [r for r in records_before if r['step'] <= max(restorable)]
  # It continued from the latest checkpoint, re-doing the steps after it: their first records
  # were dropped, so metrics.jsonl holds each step once, in order.
  assert records_after[:len(kept)] == kept
  assert [r['step'] for r in records_after if r['split'] == 'train'] == list(
      range(1, TOTAL_STEPS + 1))
  assert (workdir / 'metrics.jsonl').read_text().endswith('}\n')

  reference = reference_run.workdir()
  assert_same_train_metrics(train_records(read_metrics(workdir)),
                            train_records(read_metrics(reference)))
  assert_same_final_state(workdir, reference)
  assert read_summary(workdir)['eval'] == read_summary(reference)['eval']
  assert read_summary(workdir)['eval']['num_examples'] > 0


def test_sigterm_saves_exits_143_and_resumes_from_that_step(tmp_path, trainer_env,
                                                           reference_run):
  term_step = random.Random(143).randint(3, TOTAL_STEPS - 8)
  # No periodic checkpoints: the only one before the end is the one SIGTERM makes.
  args = (*TRAIN_ARGS, '--config.checkpoint_every=0')
  workdir, log_path = tmp_path / 'run', tmp_path / 'trainer.log'
  preempted = Trainer(workdir, args, trainer_env, log_path)
  wait_for_train_step(preempted, 1, need_checkpoint=False)
  reference_run.start()
  wait_for_train_step(preempted, term_step, need_checkpoint=False)
  preempted.process.send_signal(signal.SIGTERM)
  returncode = preempted.wait()
  assert returncode == 143, (f'exit code {returncode} after SIGTERM, expected 143:\n'
                             f'{preempted.output_tail()}')
  assert not (workdir / 'summary.json').exists(), 'the run finished before the SIGTERM'
  records_before = len(read_metrics(workdir))
  stopped_at = max(train_records(read_metrics(workdir)))
  assert term_step <= stopped_at < TOTAL_STEPS
  # The checkpoint holds the state after the last step that the run made (and logged).
  assert committed_steps(workdir) == [stopped_at]
  assert int(read_state(workdir, stopped_at)['step']) == stopped_at

  resumed = Trainer(workdir, args, trainer_env, log_path)
  resumed.finish()
  records_after = read_metrics(workdir)[records_before:]
  assert [r['step'] for r in records_after if r['split'] == 'train'] == list(
      range(stopped_at + 1, TOTAL_STEPS + 1))

  reference = reference_run.workdir()
  assert_same_train_metrics(train_records(read_metrics(workdir)),
                            train_records(read_metrics(reference)))
  assert_same_final_state(workdir, reference)
  assert read_summary(workdir)['eval'] == read_summary(reference)['eval']
