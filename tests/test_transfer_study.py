"""The transfer study and its Colab notebook run in their small form (a tiny ViT, a few steps)."""

import csv
import json
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
import numpy as np
import pytest
from safetensors import safe_open

from experiments import transfer_study

NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', 'colab', 'transfer_study.ipynb')
# Cheap ones: LoRA-family runs also export adapter/ and merged/ folders (experiments/train.py).
STRATEGIES = ['full', 'frozen']


@pytest.fixture(scope='module')
def study_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('transfer_study')


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """XLA's compiled programs cached on disk for this module, as the study's command line does.

  The runs of one strategy (and full fine-tuning, scratch and the source run, which share one
  step) compile the same programs; without the cache, compiling is most of this test's time.
  """
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  yield
  jax.config.update('jax_compilation_cache_dir', previous[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', previous[1])
  jax_compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def small_study(study_dir):
  """The small study's rows and table; the notebook's test reuses its runs, whichever test runs
  first (or alone)."""
  rows = transfer_study.run_study(str(study_dir), STRATEGIES, ['3', 'all'], small=True)
  table, _ = transfer_study.report(rows, str(study_dir))
  return rows, table


def test_small_study_writes_every_cell_the_table_and_the_plot(study_dir, small_study):
  all_per_class = int(transfer_study.target_class_sizes().max())
  rows, table = small_study

  with open(study_dir / 'results.csv', newline='') as f:
    reader = csv.reader(f)
    assert next(reader) == ['strategy', 'budget', 'metric', 'value']
    written = [dict(zip(transfer_study.COLUMNS, r)) for r in reader]
  assert transfer_study.read_csv(study_dir / 'results.csv') == [
      dict(r, budget=int(r['budget']), value=float(r['value'])) for r in rows]
  cells = {(r['strategy'], int(r['budget']), r['metric']): float(r['value']) for r in written}
  for strategy in STRATEGIES + ['scratch']:
    for budget in (3, all_per_class):
      accuracy = cells[(strategy, budget, 'accuracy')]
      assert 0.0 <= accuracy <= 1.0
      assert cells[(strategy, budget, 'train_examples')] == (
          15 if budget == 3 else sum(transfer_study.target_class_sizes()))
  assert len(written) == 3 * 2 * 6  # nothing else
  # The frozen backbone leaves only the head to train; full and scratch train everything.
  assert (cells[('frozen', 3, 'trainable_params')] < cells[('full', 3, 'trainable_params')]
          == cells[('scratch', 3, 'trainable_params')] == cells[('full', 3, 'total_params')])

  # The strategies start from the exported source backbone (no classifier: a new head), scratch
  # from random initialisation.
  model_dir = study_dir / 'source_model'
  with safe_open(model_dir / 'model.safetensors', 'np') as f:
    keys = list(f.keys())
  assert keys and not [k for k in keys if 'classifier' in k]
  for strategy, expected in (('frozen', str(model_dir)), ('scratch', '')):
    with open(study_dir / 'runs' / strategy / '3' / 'config.json') as f:
      run = json.load(f)
    assert run['init']['from_pretrained'] == expected
    assert run['data']['classes'] == [5, 6, 7, 8, 9] and run['data']['examples_per_class'] == 3

  for name in STRATEGIES + ['scratch', '3', f'{all_per_class} (all)', 'below scratch']:
    assert name in table
  with open(study_dir / transfer_study.PLOT_FILE, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_budgets_are_numbers():
  assert transfer_study.parse_budget('all') == transfer_study.target_class_sizes().max()
  assert transfer_study.parse_budget(' 7 ') == 7
  for bad in ('0', '-3', 'some'):
    with pytest.raises(ValueError, match='positive integer'):
      transfer_study.parse_budget(bad)
  with pytest.raises(ValueError, match='config.adapt.method'):
    transfer_study.run_study('/nonexistent', ['lroa'], ['5'])


def test_notebook_runs_the_study_and_loads_the_source_model(study_dir, small_study, capsys):
  """The notebook's code cells (all but the clone-and-install ones), in the small form."""
  with open(NOTEBOOK) as f:
    cells = [''.join(c['source']) for c in json.load(f)['cells'] if c['cell_type'] == 'code']
  small_form = {"WORKDIR = '/tmp/transfer_study'": f'WORKDIR = {str(study_dir)!r}',
                'SMALL = False': 'SMALL = True',
                'STRATEGIES = list(METHODS)': "STRATEGIES = ['frozen']",
                "BUDGETS = ['2', '10', 'all']": "BUDGETS = ['3', '4']"}
  del small_study  # its runs at 3 per class are in study_dir
  capsys.readouterr()
  namespace = {}
  for source in cells:
    if source.lstrip().startswith('!'):  # git clone + pip install: done by the test set-up.
      continue
    for old, new in small_form.items():
      if old in source:
        source = source.replace(old, new)
        small_form[old] = None
    exec(compile(source, NOTEBOOK, 'exec'), namespace)  # pylint: disable=exec-used
  assert not [old for old, new in small_form.items() if new is not None], 'parameters moved'
  # WORKDIR holds a source model and the runs at 3 per class of the same config: the notebook
  # loads the model, reuses those runs and trains only the new budget.
  printed = capsys.readouterr().out
  assert 'Source model: loaded' in printed
  progress = [line for line in printed.splitlines() if line.startswith('[')]
  assert len(progress) == 4
  assert all(('reused' in line) == (' 3 per class' in line) for line in progress), progress
  rows = namespace['rows']
  assert {(r['strategy'], r['budget']) for r in rows} == {
      (s, b) for s in ('frozen', 'scratch') for b in (3, 4)}
  accuracy = [r['value'] for r in rows if r['metric'] == 'accuracy']
  assert np.all((np.array(accuracy) >= 0) & (np.array(accuracy) <= 1))
  assert namespace['fig'].axes[0].get_lines()  # the figure the notebook shows inline
