"""Tests of ptm_jax.train.checkpointing on 8 CPU devices: async round trips, resharding on
restore, retention, fallback past damaged checkpoints, preemption, and the workdir guard."""

import json
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ptm_jax.partitioning import make_mesh
from ptm_jax.train import checkpointing
from ptm_jax.train.checkpointing import Checkpointer, check_workdir

# A restore that fails inside orbax abandons its asyncio tasks; Python reports them later, in
# whichever test the garbage collector runs.
pytestmark = [
    pytest.mark.filterwarnings('ignore:coroutine .* was never awaited:RuntimeWarning'),
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
]

DATA_STATE = {'grain': {'next_index': 40}, 'step': 40, 'global_batch_size': 8,
              'process_count': 1}


def _state(mesh, spec=PartitionSpec('data'), scale=1.0):
  """A small train state: a (16, 8) kernel sharded by `spec`, a bias, a step counter."""
  kernel = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) * scale
  return {
      'params': {'kernel': jax.device_put(kernel, NamedSharding(mesh, spec)),
                 'bias': jax.device_put(jnp.linspace(-1.0, 1.0, 8) * scale,
                                        NamedSharding(mesh, PartitionSpec()))},
      'step': jax.device_put(jnp.asarray(int(scale), jnp.int32),
                             NamedSharding(mesh, PartitionSpec())),
  }


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _assert_same_values(restored, expected):
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, expected)


def _shardings_like(state):
  return jax.tree.map(lambda x: x.sharding, state)


def test_async_save_wait_restore_round_trip(tmp_path):
  mesh = make_mesh(data=8)
  state = _state(mesh)
  with Checkpointer(tmp_path / 'ckpt', keep=3, save_every=10) as ckpt:
    assert ckpt.restore(_abstract(state, _shardings_like(state))) is None
    assert not ckpt.save(5, state, DATA_STATE)  # not a multiple of save_every
    assert ckpt.save(10, state, DATA_STATE)
    assert not ckpt.save(10, state, DATA_STATE, force=True)  # already saved by this run
    ckpt.wait()
    assert (tmp_path / 'ckpt' / '10').is_dir()
    assert ckpt.latest_step() == 10 and ckpt.all_steps() == [10]
  # A new Checkpointer on the directory, as after a restart.
  with Checkpointer(tmp_path / 'ckpt') as ckpt:
    step, restored, data_state = ckpt.restore(_abstract(state, _shardings_like(state)))
  assert step == 10
  assert data_state == DATA_STATE
  _assert_same_values(restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert got.sharding == want.sharding
    assert got.dtype == want.dtype


def test_keep_retains_latest_steps(tmp_path):
  mesh = make_mesh(data=8)
  with Checkpointer(tmp_path, keep=2, save_every=1) as ckpt:
    for step in (1, 2, 3, 4):
      ckpt.save(step, _state(mesh, scale=step), {'step': step})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['3', '4']


@pytest.mark.parametrize('mesh_axes, kernel_spec, bias_spec', [
    (dict(data=2, tensor=4), PartitionSpec('tensor', 'data'), PartitionSpec('tensor')),
    (dict(data=1, fsdp=8), PartitionSpec(None, 'fsdp'), PartitionSpec('fsdp')),
    (dict(data=2, tensor=4), PartitionSpec(), PartitionSpec()),  # replicated
])
def test_restore_onto_another_mesh(tmp_path, mesh_axes, kernel_spec, bias_spec):
  saved = _state(make_mesh(data=8), PartitionSpec('data'), scale=3.0)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(7, saved, None, force=True)
  new_mesh = make_mesh(**mesh_axes)
  shardings = {'params': {'kernel': NamedSharding(new_mesh, kernel_spec),
                          'bias': NamedSharding(new_mesh, bias_spec)},
               'step': NamedSharding(new_mesh, PartitionSpec())}
  with Checkpointer(tmp_path) as ckpt:
    step, restored, data_state = ckpt.restore(_abstract(saved, shardings))
  assert step == 7 and data_state is None
  _assert_same_values(restored, saved)
  assert restored['params']['kernel'].sharding == shardings['params']['kernel']
  assert restored['params']['bias'].sharding == shardings['params']['bias']
  # Each device holds the shard the new spec gives it, not a copy of the saved layout.
  kernel = restored['params']['kernel']
  expected_shard_shape = shardings['params']['kernel'].shard_shape(kernel.shape)
  assert all(s.data.shape == expected_shard_shape for s in kernel.addressable_shards)


def test_restore_requires_shardings(tmp_path):
  mesh = make_mesh(data=8)
  state = _state(mesh)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, force=True)
    unsharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with pytest.raises(ValueError, match='sharding'):
      ckpt.restore(unsharded)


def _array_files(step_dir):
  """The tensorstore data files of a step's 'state' item (under .../d/)."""
  return [os.path.join(root, name) for root, _, names in os.walk(step_dir / 'state')
          if os.path.basename(root) == 'd' for name in names]


@pytest.mark.parametrize('damage', ['delete', 'truncate'])
def test_damaged_latest_falls_back_with_warning(tmp_path, caplog, damage):
  mesh = make_mesh(data=8)
  first, second = _state(mesh, scale=1.0), _state(mesh, scale=2.0)
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, first, {'step': 1})
    ckpt.save(2, second, {'step': 2})
  files = _array_files(tmp_path / '2')
  assert files
  for path in files:
    if damage == 'delete':
      os.remove(path)
    else:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 3)
  abstract = _abstract(first, _shardings_like(first))
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
      step, restored, data_state = ckpt.restore(abstract)
    assert step == 1 and data_state == {'step': 1}
    _assert_same_values(restored, first)
    warnings = [r.getMessage() for r in caplog.records if r.name == checkpointing.__name__]
    assert any('step 2' in m and 'does not restore' in m for m in warnings), warnings
    # Training on from step 1 saves step 2 again, replacing the damaged one.
    assert ckpt.save(2, second, {'step': 2})
    ckpt.wait()
    step, restored, _ = ckpt.restore(abstract)
  assert step == 2
  _assert_same_values(restored, second)


def test_no_restorable_step_raises_listing_steps(tmp_path):
  mesh = make_mesh(data=8)
  state = _state(mesh)
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state)
    ckpt.save(2, state)
  for step in ('1', '2'):
    for path in _array_files(tmp_path / step):
      os.remove(path)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(RuntimeError, match=r'(?s)step 2: .*step 1: '):
      ckpt.restore(_abstract(state, _shardings_like(state)))
    # An explicit step does not fall back.
    with pytest.raises(FileNotFoundError, match='step 5'):
      ckpt.restore(_abstract(state, _shardings_like(state)), step=5)


def test_an_explicit_step_restores_that_step_and_does_not_fall_back(tmp_path):
  mesh = make_mesh(data=8)
  states = {step: _state(mesh, scale=float(step)) for step in (1, 2, 3)}
  with Checkpointer(tmp_path, keep=None, save_every=1) as ckpt:
    for step, state in states.items():
      ckpt.save(step, state, {'step': step})
  abstract = _abstract(states[1], _shardings_like(states[1]))
  with Checkpointer(tmp_path) as ckpt:
    step, restored, data_state = ckpt.restore(abstract, step=2)  # an older step than the latest
    assert step == 2 and data_state == {'step': 2}
    _assert_same_values(restored, states[2])
  for path in _array_files(tmp_path / '1'):
    os.remove(path)
  with Checkpointer(tmp_path) as ckpt:
    # Step 1 is damaged: asked for by name, it raises instead of handing back another step.
    with pytest.raises(Exception) as error:
      ckpt.restore(abstract, step=1)
    assert not isinstance(error.value, FileNotFoundError)
    step, restored, _ = ckpt.restore(abstract)  # the latest is still whole
  assert step == 3
  _assert_same_values(restored, states[3])


def test_synchronous_saves_are_committed_when_save_returns(tmp_path):
  mesh = make_mesh(data=8)
  state = _state(mesh, scale=4.0)
  ckpt = Checkpointer(tmp_path, async_save=False, save_every=2)
  try:
    assert ckpt.save(4, state, DATA_STATE)
    # No wait(): the step directory is already committed (not a '.orbax-checkpoint-tmp' one).
    assert sorted(p.name for p in tmp_path.iterdir()) == ['4']
    with Checkpointer(tmp_path) as reader:
      step, restored, data_state = reader.restore(_abstract(state, _shardings_like(state)))
    assert step == 4 and data_state == DATA_STATE
    _assert_same_values(restored, state)
  finally:
    ckpt.close()


@pytest.mark.parametrize('kwargs, message', [({'keep': 0}, 'keep=0 must be >= 1'),
                                             ({'save_every': -1}, 'save_every=-1 must be >= 0')])
def test_bad_retention_settings_are_refused(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    Checkpointer(tmp_path / 'ckpt', **kwargs)
  assert not (tmp_path / 'ckpt').exists()  # refused before anything is created


def test_uncommitted_tmp_directory_is_ignored(tmp_path):
  mesh = make_mesh(data=8)
  state = _state(mesh)
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state, {'step': 1})
  # What a kill -9 mid-save leaves: the step's files in '<step>.orbax-checkpoint-tmp', never
  # renamed to '<step>' (here a copy of a whole checkpoint: only the name marks it uncommitted).
  leftover = tmp_path / '3.orbax-checkpoint-tmp'
  shutil.copytree(tmp_path / '1', leftover)
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert not leftover.exists()  # deleted when the Checkpointer opened the directory
    step, _, data_state = ckpt.restore(_abstract(state, _shardings_like(state)))
    assert step == 1 and data_state == {'step': 1}
    assert ckpt.save(3, state, {'step': 3})
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '3']


def test_sigterm_sets_flag_and_handler_is_restored(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  ckpt = Checkpointer(tmp_path)
  try:
    ckpt.install_sigterm_handler()
    assert not ckpt.reached_preemption(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.preempted  # and the process is still alive
    assert ckpt.reached_preemption(2)
  finally:
    ckpt.close()
  assert signal.getsignal(signal.SIGTERM) is previous


def _config(**overrides):
  config = {'model': {'name': 'bert', 'hidden': 64}, 'optimizer': {'lr': 1e-3},
            'total_steps': 100, 'log_every': 10}
  for key, value in overrides.items():
    section, _, name = key.partition('__')
    if name:
      config[section] = {**config[section], name: value}
    else:
      config[section] = value
  return json.dumps(config)


def test_check_workdir_same_config_resumes(tmp_path):
  workdir = tmp_path / 'run'
  assert not check_workdir(workdir, _config(), overwrite=False)
  assert json.loads((workdir / 'config.json').read_text()) == json.loads(_config())
  (workdir / 'checkpoints').mkdir()
  # Allowed keys may change; the new values are recorded.
  assert check_workdir(workdir, _config(total_steps=200, log_every=5), overwrite=False)
  assert json.loads((workdir / 'config.json').read_text())['total_steps'] == 200
  # overwrite does not wipe a run of the same config (a restarted job keeps its progress).
  assert check_workdir(workdir, _config(total_steps=200), overwrite=True)
  assert (workdir / 'checkpoints').is_dir()


def test_check_workdir_different_config_raises_then_overwrite_clears(tmp_path):
  workdir = tmp_path / 'run'
  check_workdir(workdir, _config(), overwrite=False)
  (workdir / 'checkpoints' / '10').mkdir(parents=True)
  changed = _config(optimizer__lr=3e-4, total_steps=500)
  with pytest.raises(ValueError, match='--overwrite') as error:
    check_workdir(workdir, changed, overwrite=False)
  message = str(error.value)
  assert 'optimizer.lr: 0.001' in message and '0.0003' in message
  assert 'total_steps' not in message  # allowed to differ
  assert (workdir / 'checkpoints' / '10').is_dir()
  # A key allowed by dotted path.
  assert check_workdir(workdir, _config(optimizer__lr=3e-4), overwrite=False,
                       allowed_to_differ=('optimizer.lr',))
  assert not check_workdir(workdir, _config(model__hidden=128), overwrite=True)
  assert sorted(p.name for p in workdir.iterdir()) == ['config.json']
  assert json.loads((workdir / 'config.json').read_text())['model']['hidden'] == 128


def test_check_workdir_allows_every_key_under_an_allowed_section(tmp_path):
  # The trainer's RESUMABLE_KEYS name sections ('profile', 'runtime'): a resumed run may change
  # any key under them, at the top or deeper, but nothing else.
  from ptm_jax.train.config import RESUMABLE_KEYS
  workdir = tmp_path / 'run'
  check_workdir(workdir, _config(profile={'num_steps': 3, 'dir': ''}), overwrite=False,
                allowed_to_differ=RESUMABLE_KEYS)
  (workdir / 'metrics.jsonl').write_text('{}\n')  # the run has progress to keep
  assert check_workdir(workdir, _config(profile={'num_steps': 5, 'dir': 'p'}), overwrite=False,
                       allowed_to_differ=RESUMABLE_KEYS)
  assert check_workdir(workdir, _config(model__runtime={'threads': 2}), overwrite=False,
                       allowed_to_differ=RESUMABLE_KEYS)
  with pytest.raises(ValueError, match='model.hidden'):
    check_workdir(workdir, _config(model__hidden=128, profile={'num_steps': 7}),
                  overwrite=False, allowed_to_differ=RESUMABLE_KEYS)
  # A section named by its dotted path allows what is under it, not its siblings.
  workdir = tmp_path / 'other_run'
  check_workdir(workdir, _config(), overwrite=False)
  (workdir / 'metrics.jsonl').write_text('{}\n')
  assert check_workdir(workdir, _config(model__sub={'a': 1}), overwrite=False,
                       allowed_to_differ=('model.sub',))
  with pytest.raises(ValueError, match='model.name'):
    check_workdir(workdir, _config(model__name='gpt2'), overwrite=False,
                  allowed_to_differ=('model.sub',))


def test_check_workdir_refuses_a_file(tmp_path):
  (tmp_path / 'run').write_text('not a directory')
  for overwrite in (False, True):
    with pytest.raises(ValueError, match='workdir .*run is a file, not a directory'):
      check_workdir(tmp_path / 'run', _config(), overwrite=overwrite)
  assert (tmp_path / 'run').read_text() == 'not a directory'


def test_check_workdir_refuses_unrelated_files(tmp_path):
  (tmp_path / 'notes.txt').write_text('not a run')
  with pytest.raises(ValueError, match='no config.json'):
    check_workdir(tmp_path, _config(), overwrite=False)
  assert not check_workdir(tmp_path, _config(), overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']


@pytest.mark.parametrize('config_json, message', [('[1, 2]', 'must be a JSON object'),
                                                  ('{"model": ', 'config_json is not valid JSON')])
def test_check_workdir_refuses_a_config_that_is_not_a_json_object(tmp_path, config_json, message):
  with pytest.raises(ValueError, match=message):
    check_workdir(tmp_path / 'run', config_json, overwrite=True)
  assert not (tmp_path / 'run').exists()


def test_check_workdir_names_a_damaged_config_json_and_keeps_the_run(tmp_path):
  workdir = tmp_path / 'run'
  check_workdir(workdir, _config(), overwrite=False)
  (workdir / 'checkpoints' / '10').mkdir(parents=True)
  (workdir / 'config.json').write_text('{"model": {"name": "be')  # cut short
  with pytest.raises(ValueError, match=r'config\.json is not valid JSON.*--overwrite'):
    check_workdir(workdir, _config(), overwrite=False)
  assert (workdir / 'checkpoints' / '10').is_dir()
  # As the message says, --overwrite then starts afresh.
  assert not check_workdir(workdir, _config(), overwrite=True)
  assert sorted(p.name for p in workdir.iterdir()) == ['config.json']
  assert json.loads((workdir / 'config.json').read_text()) == json.loads(_config())


def test_check_workdir_lets_a_start_that_never_logged_change_its_config(tmp_path):
  # A first command failed after writing config.json (a bad model name): the corrected command
  # starts afresh in the same workdir, as nothing would be lost; with progress, it is refused.
  workdir = tmp_path / 'run'
  check_workdir(workdir, _config(), overwrite=False)
  (workdir / 'checkpoints').mkdir()  # made, still empty
  # A text task's start saves its tokenizer before it builds and compiles the model.
  (workdir / 'tokenizer.json').write_text('{"model": {"type": "BPE"}}')
  assert not check_workdir(workdir, _config(model__name='gpt2'), overwrite=False)
  assert json.loads((workdir / 'config.json').read_text())['model']['name'] == 'gpt2'
  assert not (workdir / 'tokenizer.json').exists()  # the old config's; the new start writes its own
  (workdir / 'metrics.jsonl').write_text('{"step": 1}\n')
  with pytest.raises(ValueError, match='model.name'):
    check_workdir(workdir, _config(model__name='bert'), overwrite=False)
  assert (workdir / 'metrics.jsonl').exists()


@pytest.mark.parametrize('keep', [0, -2])
def test_keep_checkpoints_below_1_is_a_config_error(keep):
  # Found by finalize, before the data is loaded and the step compiled, not by the Checkpointer.
  from ptm_jax.train.config import base_config, finalize
  config = base_config()
  config.keep_checkpoints = keep
  with pytest.raises(ValueError, match=f'config.keep_checkpoints={keep} must be at least 1'):
    finalize(config)
  config.keep_checkpoints = None  # keeps every checkpoint
  assert finalize(config).keep_checkpoints is None
