r"""The transfer study: pre-training plus adaptation against training from scratch, by label budget.

  python -m experiments.transfer_study --workdir=DIR [--strategies=full,lora,...] \
      [--budgets=2,10,all] [--seed=0] [--small]

On the embedded handwritten digits (no download), with the trainer (experiments/train.py) and
configs/transfer_digits.py:
  1. Source task: a small ViT learns digits 0-4 from all of their training images. Its weights
     go to DIR/source_model as a transformers ViTModel folder (ptm_jax.save_pretrained) without
     the classifier; a later study in the same DIR with the same source config loads it.
  2. Target task: digits 5-9, with a labelled-data budget of k training images per class
     (config.data.examples_per_class: the same seeded subset for every strategy; 'all' is every
     training image). Each strategy (a config.adapt.method) starts from DIR/source_model through
     config.init.from_pretrained, the loading path of any checkpoint, with a new 5-way head;
     `scratch` trains the same architecture from random initialisation on the same images.
     Every target run takes the same steps, batch, learning rate and schedule (100 steps of 32
     images): one compute budget, so the table compares what each strategy learns with it.
  3. DIR/results.csv (strategy, budget, metric, value; metrics: accuracy and loss on the whole
     5-9 test split, trainable_params, total_params, train_examples, seconds), the accuracy table
     on stdout, and DIR/transfer_study.png (accuracy against budget).

Finished target runs of the same config (and source model) are reused, so an interrupted study
resumes and one more strategy or budget runs only the new cells; delete DIR to start afresh.
Each run's own files (metrics.jsonl, summary.json) are in DIR/runs/STRATEGY/BUDGET, its printed
lines in DIR/runs/STRATEGY/BUDGET.txt.
XLA's compiled programs are cached in DIR/jax_cache: the runs of one strategy at different
budgets compile the same step, and only the first one pays for it.

--small is the tests' form: a 2-block model and a few steps (nothing to read in its numbers).
"""

import contextlib
import csv
import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import time
from typing import Callable, Sequence

from absl import app, flags, logging
import jax
import numpy as np

import ptm_jax
from ptm_jax.adapt import config as adapt_config_lib
from ptm_jax.data import embedded, pipeline
from ptm_jax.models import registry
from ptm_jax.train import checkpointing

from experiments import train

SCRATCH = 'scratch'
COLUMNS = ('strategy', 'budget', 'metric', 'value')
PLOT_FILE = 'transfer_study.png'
SOURCE_STAMP = 'source_run.json'   # in DIR/source_model: the source config it was trained with
RUN_STAMP = 'study_result.json'    # in each target run's directory: its config and result rows
# configs/ is not a package: the config file is loaded by path, as config_flags does.
_CONFIG_FILE = os.path.join(os.path.dirname(__file__), '..', 'configs', 'transfer_digits.py')


def _config_module():
  spec = importlib.util.spec_from_file_location('transfer_digits', _CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CONFIGS = _config_module()


def run_config(stage: str, small: bool, seed: int):
  """configs/transfer_digits.py's config of a source or target run."""
  arg = f'stage={stage}' + (',runlocal' if small else '')
  config = CONFIGS.get_config(arg)
  config.seed = seed
  return config


# ------------------------------------------------------------------------------------------------
# Budgets.


@functools.lru_cache(maxsize=1)
def target_class_sizes() -> np.ndarray:
  """Training images of each target class (digits 5-9), in label order."""
  labels = embedded.digits('train', classes=CONFIGS.TARGET_CLASSES).arrays['label']
  return np.bincount(labels)


def parse_budget(budget: str | int) -> int:
  """'all' or a positive count -> labelled training images per class.

  'all' is the largest class's size: a per-class limit that keeps every image is exactly the
  whole split, and it keeps the budget a number.
  """
  if str(budget).strip().lower() == 'all':
    return int(target_class_sizes().max())
  try:
    value = int(budget)
  except ValueError:
    value = 0
  if value < 1:
    raise ValueError(f'A budget is labelled images per class (a positive integer) or "all", '
                     f'not {budget!r}.')
  return value


# ------------------------------------------------------------------------------------------------
# Runs.


def _run(config, workdir: str) -> tuple[dict, float]:
  """(summary, seconds) of one fresh trainer run in workdir; what it prints goes to workdir.txt.

  (Thirty runs' progress bars and log lines would bury the study's own; a failure still raises.)
  """
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  start = time.time()
  with open(f'{workdir}.txt', 'w', encoding='utf-8') as out, contextlib.redirect_stdout(out), \
      contextlib.redirect_stderr(out):
    summary = train.train_and_evaluate(config, workdir)
  return summary, time.time() - start


def _final_params(run_dir: str) -> dict:
  """The trained parameters of a finished run, read from its last checkpoint."""
  directory = os.path.join(run_dir, 'checkpoints')
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  import orbax.checkpoint as ocp  # Imported here: only the export reads a checkpoint directly.
  state = ocp.StandardCheckpointer().restore(
      os.path.join(directory, str(step), checkpointing.STATE_ITEM))
  return jax.tree.map(np.asarray, state['params'])


def export_source_model(config, run_dir: str, out_dir: str):
  """Writes the source run's backbone as a transformers ViTModel folder (no classifier).

  Without the classifier the target run's `init.from_pretrained` loads the backbone and
  initialises a new head, as for any pre-trained checkpoint.
  """
  data = pipeline.merged_config(config.data)
  info = pipeline.DatasetInfo(task=data.task, split=data.train_split, num_examples=None,
                              num_classes=len(data.classes))
  family, vit_config = registry.model_config(config.model, data.task, info, data)
  params = _final_params(run_dir)
  backbone = registry.FAMILIES[family][0](
      dataclasses.replace(vit_config, add_pooling_layer=False), head=None)
  ptm_jax.save_pretrained(backbone, {'params': {family: params[family]}}, out_dir)


def source_model(workdir: str, small: bool, seed: int, log: Callable[[str], None]) -> str:
  """DIR/source_model: loaded when its source config matches this one, else pre-trained."""
  config = run_config('source', small, seed)
  out_dir = os.path.join(workdir, 'source_model')
  stamp = os.path.join(out_dir, SOURCE_STAMP)
  config_json = config.to_json_best_effort(sort_keys=True)
  if os.path.exists(stamp):
    with open(stamp, encoding='utf-8') as f:
      made = json.load(f)
    if made['config'] == config_json:
      log(f'Source model: loaded {out_dir} (digits 0-4 test accuracy '
          f'{made["accuracy"]:.3f}).')
      return out_dir
  shutil.rmtree(out_dir, ignore_errors=True)
  log('Source model: pre-training on digits 0-4 ...')
  run_dir = os.path.join(workdir, 'source')
  summary, seconds = _run(config, run_dir)
  export_source_model(config, run_dir, out_dir)
  accuracy = summary['eval']['accuracy']
  with open(stamp, 'w', encoding='utf-8') as f:
    json.dump({'config': config_json, 'accuracy': accuracy, 'seconds': seconds}, f)
  log(f'Source model: digits 0-4 test accuracy {accuracy:.3f} after {config.total_steps} steps '
      f'({seconds:.1f} s), saved to {out_dir}.')
  return out_dir


def target_run(strategy: str, per_class: int, pretrained: str, workdir: str, *, small: bool,
               seed: int, target_steps: int = 0) -> tuple[list[dict], bool]:
  """One target run -> (its result rows (strategy, budget, metric, value), whether reused).

  A finished run of the same config (and, for a pre-trained start, the same source model) in
  DIR/runs/STRATEGY/BUDGET is reused: an interrupted study resumes, and a study with one more
  strategy or budget runs only the new cells.
  """
  config = run_config('target', small, seed)
  config.data.examples_per_class = per_class
  if target_steps:
    config.total_steps = target_steps
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, target_steps // 10)
  if strategy == SCRATCH:
    config.adapt.method = 'full'
  else:
    config.adapt.method = strategy
    config.init.from_pretrained = pretrained
  run_dir = os.path.join(workdir, 'runs', strategy, str(per_class))
  key = {'config': config.to_json_best_effort(sort_keys=True), 'source': ''}
  if strategy != SCRATCH:
    with open(os.path.join(pretrained, SOURCE_STAMP), encoding='utf-8') as f:
      key['source'] = json.load(f)['config']
  stamp = os.path.join(run_dir, RUN_STAMP)
  if os.path.exists(stamp):
    with open(stamp, encoding='utf-8') as f:
      made = json.load(f)
    if made['key'] == key:
      return made['rows'], True
  summary, seconds = _run(config, run_dir)
  values = {'accuracy': summary['eval']['accuracy'], 'loss': summary['eval']['loss'],
            'trainable_params': summary['trainable_params'],
            'total_params': summary['total_params'],
            'train_examples': int(np.minimum(target_class_sizes(), per_class).sum()),
            'seconds': round(seconds, 2)}
  rows = [{'strategy': strategy, 'budget': per_class, 'metric': k, 'value': v}
          for k, v in values.items()]
  with open(stamp, 'w', encoding='utf-8') as f:
    json.dump({'key': key, 'rows': rows}, f)
  return rows, False


def run_study(workdir: str, strategies: Sequence[str] = adapt_config_lib.METHODS,
              budgets: Sequence[str | int] = ('2', '10', 'all'), *, small: bool = False,
              seed: int = 0, target_steps: int = 0,
              log: Callable[[str], None] = print) -> list[dict]:
  """Runs the study (see the module docstring) and writes DIR/results.csv; returns its rows.

  Args:
    workdir: DIR.
    strategies: config.adapt.method names; `scratch` is always added.
    budgets: labelled training images per class of the target task, or 'all'.
    small: the tests' form (tiny model, few steps).
    seed: model initialisation, data order and the labelled subset (the same for every run).
    target_steps: steps of every target run (0: the config's).
    log: where progress lines go.
  """
  strategies = [s for s in strategies if s != SCRATCH]
  unknown = [s for s in strategies if s not in adapt_config_lib.METHODS]
  if unknown:
    raise ValueError(f'Unknown strategies {unknown}: each is a config.adapt.method, one of '
                     f'{adapt_config_lib.METHODS} (scratch is always run).')
  per_class = sorted({parse_budget(b) for b in budgets})
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  pretrained = source_model(workdir, small, seed, log)
  rows: list[dict] = []
  runs = [(s, k) for k in per_class for s in strategies + [SCRATCH]]
  for i, (strategy, k) in enumerate(runs):
    new, reused = target_run(strategy, k, pretrained, workdir, small=small, seed=seed,
                             target_steps=target_steps)
    rows += new
    got = {r['metric']: r['value'] for r in new}
    log(f'[{i + 1}/{len(runs)}] {strategy:>16} at {k:>3} per class: accuracy '
        f'{got["accuracy"]:.3f}, {got["trainable_params"]:,} trainable, {got["seconds"]:.1f} s'
        + (' (reused from an earlier study)' if reused else ''))
  write_csv(rows, os.path.join(workdir, 'results.csv'))
  log(f'The study took {time.time() - start:.0f} s.')
  return rows


# ------------------------------------------------------------------------------------------------
# Results: CSV, table, plot.


def write_csv(rows: Sequence[dict], path: str):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def read_csv(path: str) -> list[dict]:
  with open(path, newline='', encoding='utf-8') as f:
    return [dict(r, budget=int(r['budget']), value=float(r['value'])) for r in csv.DictReader(f)]


def _grid(rows: Sequence[dict], metric: str) -> tuple[list[str], list[int], dict]:
  """(strategies in order of appearance, budgets ascending, {(strategy, budget): value})."""
  values = {(r['strategy'], int(r['budget'])): float(r['value'])
            for r in rows if r['metric'] == metric}
  strategies = list(dict.fromkeys(s for s, _ in values))
  budgets = sorted({b for _, b in values})
  return strategies, budgets, values


def _budget_label(budget: int) -> str:
  return f'{budget} (all)' if budget >= target_class_sizes().max() else str(budget)


def format_table(rows: Sequence[dict]) -> str:
  """Target test accuracy, strategies x budgets, with trainable parameters and the losses."""
  strategies, budgets, acc = _grid(rows, 'accuracy')
  _, _, trainable = _grid(rows, 'trainable_params')
  header = ['strategy', 'trainable'] + [_budget_label(b) for b in budgets]
  lines = [header]
  for s in strategies:
    lines.append([s, f'{int(trainable[(s, budgets[0])]):,}']
                 + [f'{acc[(s, b)]:.3f}' for b in budgets])
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  text = ['Target (digits 5-9) test accuracy by labelled images per class:']
  for j, line in enumerate(lines):
    text.append('  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                          for i, (c, w) in enumerate(zip(line, widths))))
    if j == 0:
      text.append('  '.join('-' * w for w in widths))
  if SCRATCH in strategies:
    for b in budgets:
      losers = [f'{s} {acc[(s, b)]:.3f}' for s in strategies
                if s != SCRATCH and acc[(s, b)] < acc[(SCRATCH, b)]]
      text.append(f'At {_budget_label(b)} per class, below scratch ({acc[(SCRATCH, b)]:.3f}): '
                  + (', '.join(losers) if losers else 'none') + '.')
  return '\n'.join(text)


def plot(rows: Sequence[dict], path: str):
  """Saves accuracy against budget (one line per strategy) as a PNG; returns the Figure.

  Drawn on a bare matplotlib Figure with the Agg canvas: no pyplot, no global backend, so it
  works the same in a terminal and a notebook (where the returned Figure shows inline).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  strategies, budgets, acc = _grid(rows, 'accuracy')
  fig = Figure(figsize=(8.5, 4.8), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for s in strategies:
    style = dict(color='black', linestyle='--', linewidth=2.2) if s == SCRATCH else {}
    ax.plot(budgets, [acc[(s, b)] for b in budgets], marker='o', label=s, **style)
  if len(budgets) > 1 and budgets[0] > 0:
    ax.set_xscale('log')
  ax.set_xticks(budgets, [_budget_label(b) for b in budgets])
  ax.minorticks_off()
  ax.set_xlabel('labelled training images per class (digits 5-9)')
  ax.set_ylabel('test accuracy')
  ax.set_title('Pre-trained on digits 0-4, adapted to 5-9, against scratch')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='center left', bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path)
  return fig


def report(rows: Sequence[dict], workdir: str):
  """(the table as text, the Figure), the plot saved as DIR/transfer_study.png."""
  return format_table(rows), plot(rows, os.path.join(workdir, PLOT_FILE))


# ------------------------------------------------------------------------------------------------

# --workdir (DIR) is the trainer's flag, defined by experiments.train.
_STRATEGIES = flags.DEFINE_list('strategies', list(adapt_config_lib.METHODS),
                                'config.adapt.method names to compare (scratch is always run).')
_BUDGETS = flags.DEFINE_list('budgets', ['2', '10', 'all'],
                             'Labelled training images per class of the target task, or "all".')
_SMALL = flags.DEFINE_bool('small', False, 'The tests\' form: a tiny model, a few steps.')
_SEED = flags.DEFINE_integer('seed', 0, 'Initialisation, data order and labelled subset.')
_TARGET_STEPS = flags.DEFINE_integer('target_steps', 0, 'Steps of each target run (0: the '
                                     'config\'s, 100).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  workdir = flags.FLAGS.workdir
  # Runs of one strategy at several budgets compile identical programs: cache them on disk.
  jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  rows = run_study(workdir, _STRATEGIES.value, _BUDGETS.value, small=_SMALL.value,
                   seed=_SEED.value, target_steps=_TARGET_STEPS.value)
  table, _ = report(rows, workdir)
  print(table)
  print(f'Wrote {os.path.join(workdir, "results.csv")} and '
        f'{os.path.join(workdir, PLOT_FILE)}.')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
