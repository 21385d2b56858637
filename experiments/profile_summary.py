r"""Where a compiled step spent its time, from a jax.profiler trace (ptm_jax.train.profiling).

  python -m experiments.profile_summary --profile_dir=DIR [--hlo=FILE] [--top=25] [--json_out=F]

DIR: experiments.benchmark's --profile_dir, or the trainer's WORKDIR/profile (config.profile).
Both write the compiled step's text there too (*.hlo.txt), which names each op by its source.
Prints, per device and compiled module, op time per execution by category, by phase and by
instruction; --json_out also writes it as JSON.
"""

import glob
import json
import os

from absl import app, flags

from ptm_jax.train import profiling

FLAGS = flags.FLAGS


def run(profile_dir: str, hlo: str = '', top: int = 25, json_out: str = '',
        steps: int | None = None) -> dict:
  """Prints the summary of the latest trace under profile_dir (and writes it to json_out)."""
  if not hlo:
    found = sorted(glob.glob(os.path.join(profile_dir, '*.hlo.txt')))
    if len(found) == 1:
      hlo = found[0]
    else:
      print(f'{len(found)} *.hlo.txt files in {profile_dir} ({", ".join(found) or "none"}): ops '
            'are not named by their source; choose one with --hlo.')
  hlo_text = None
  if hlo:
    with open(hlo, encoding='utf-8') as f:
      hlo_text = f.read()
  summary = profiling.summarize(profiling.find_trace(profile_dir), hlo_text, top=top,
                                steps=steps)
  print(profiling.format_summary(summary))
  if json_out:
    with open(json_out, 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}.')
  run(FLAGS.profile_dir, FLAGS.hlo, FLAGS.top, FLAGS.json_out, FLAGS.steps)


if __name__ == '__main__':
  # Defined here, not on import: experiments.benchmark, imported beside this, has flags of the
  # same names.
  flags.DEFINE_string('profile_dir', None, 'Directory that jax.profiler.trace wrote.')
  flags.DEFINE_string('hlo', '', 'The compiled module\'s text, to name ops by their source '
                      '(default: the one *.hlo.txt in --profile_dir, if there is one).')
  flags.DEFINE_integer('top', 25, 'Instructions listed per device and module.')
  flags.DEFINE_string('json_out', '', 'Also write the summary as JSON here.')
  flags.DEFINE_integer('steps', None, 'Executions in the trace where its events do not number '
                       'them (GPU traces): the trainer\'s profile.num_steps, the benchmark\'s 3.')
  flags.mark_flags_as_required(['profile_dir'])
  app.run(main)
