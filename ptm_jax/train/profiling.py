"""Where a compiled step spends its time, read from a jax.profiler trace.

The command line is experiments/profile_summary.py. A profile directory is what
`jax.profiler.trace` wrote (experiments.benchmark's --profile_dir, the trainer's WORKDIR/profile);
the latest `*.trace.json.gz` under it is read. The events that XLA tags with the HLO instruction
they ran on a device count (the CPU's thunks, which carry their device's ordinal; a GPU's
kernels; not the host's kernel launches), per device and per compiled module:

- op time per execution (self time: a conditional's or a loop's own time, without the ops inside
  it, so nothing is counted twice), by category (see CATEGORIES), by phase (forward, backward,
  other: what is not differentiated, such as the optimizer's update; a fusion takes the phase of
  its root op, and a loss taken inside value_and_grad is forward) and by instruction;
- the span of the executions, first op start to last op end: op time / span is how busy the
  device was. On a GPU the gap is the device waiting for kernels to be launched; on the CPU,
  where XLA spreads one device's ops over the threads of its pool, op time can exceed the span.
  A GPU's events do not number their executions: pass `steps` (one span then covers them all,
  the gaps between steps included).

On the CPU, tracing costs every op a fixed amount, which a program of many small ops feels: the
shakespeare_char step (about 660 ops per device) spans 62 ms traced against 31 ms untraced, and
its all-reduce, where each device waits for the other, grows most. Read a CPU profile for its
shares, and time steps untraced (the benchmark's rounds, the trainer's steps/s).

Given the compiled module's text (`compiled.as_text()`; the benchmark and the trainer write it
next to the trace, write_hlo), that module's instructions are named by the source operation they
came from (the JAX name stack, with layer indices folded: layer_3/mlp -> layer_N/mlp), phases
come from it, and custom calls are placed by their target (cuDNN's attention, cuBLAS); without
it phases are unknown. Collective time includes waiting for the other devices to arrive.
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import re

import jax


CATEGORIES = ('dot', 'convolution', 'fused attention', 'elementwise or reduce fusion',
              'collective', 'copy/transpose', 'other')
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all',
                'collective-broadcast', 'send', 'recv')


def category(op: str) -> str:
  """The category of an HLO instruction, a custom call's target or a GPU kernel's name; see
  CATEGORIES."""
  name = op.lower()
  if any(name.startswith(c) for c in _COLLECTIVES) or 'nccl' in name:
    return 'collective'
  # Before attention and dots: cuDNN's convolutions; 'convert' is not a convolution.
  if re.search(r'(^|[_.\-$])conv(olution)?([_.\-$]|\d|$)', name) or 'cudnn$conv' in name:
    return 'convolution'
  if any(k in name for k in ('fmha', 'flash', 'attention', 'sdpa')):
    return 'fused attention'
  if any(k in name for k in ('dot', 'gemm', 'matmul', 'cublas', 'xmma', 'cutlass')) \
      or name.startswith('ynn_fusion'):  # YNNPACK's fusions are its dots
    return 'dot'
  bare = re.sub(r'^(loop|input|wrapped)_', '', re.sub(r'[.\d]+$', '', name))
  if 'fusion' in name or name.startswith('triton'):
    # XLA names a fusion after its ops; copy/transpose-only fusions move data, nothing else.
    parts = [p for p in bare.split('_') if p != 'fusion']
    if parts and all(p in ('copy', 'transpose', 'bitcast') for p in parts):
      return 'copy/transpose'
    return 'elementwise or reduce fusion'
  if bare.startswith(('copy', 'transpose')):
    return 'copy/transpose'
  return 'other'


def _fold_layers(source: str) -> str:
  return re.sub(r'layer_\d+', 'layer_N', source)


def phase(source: str | None) -> str:
  """forward, backward or other (optimizer, loss, ...) from a JAX name stack; unknown without."""
  if not source:
    return 'unknown'
  if 'transpose(jvp(' in source:
    return 'backward'
  if 'jvp(' in source:
    return 'forward'
  return 'other'


@dataclasses.dataclass
class HloInfo:
  """What a compiled module's text says of its instructions."""
  module: str                                        # the HloModule's name, e.g. jit_train_step
  sources: dict[str, str]                            # instruction -> its op_name metadata
  targets: dict[str, str]                            # custom call -> its custom_call_target


def parse_hlo(hlo_text: str) -> HloInfo:
  """The module name, op_name sources and custom-call targets of a compiled module's text."""
  header = re.search(r'^HloModule ([\w.\-]+)', hlo_text, re.M)
  sources, targets = {}, {}
  for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*)$', hlo_text, re.M):
    name, rest = m.groups()
    source = re.search(r'metadata=\{[^}]*?op_name="([^"]*)"', rest)
    if source:
      sources.setdefault(name, source.group(1))
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    if target:
      targets.setdefault(name, target.group(1))
  return HloInfo(header.group(1) if header else '', sources, targets)


def find_trace(profile_dir: str) -> str:
  traces = glob.glob(os.path.join(profile_dir, '**', '*.trace.json.gz'), recursive=True)
  if not traces:
    raise FileNotFoundError(
        f'No *.trace.json.gz under {profile_dir!r}: point --profile_dir at the directory that '
        'jax.profiler.trace wrote (experiments.benchmark --profile_dir=DIR, or the trainer\'s '
        'WORKDIR/profile with config.profile.num_steps > 0).')
  return max(traces, key=os.path.getmtime)


@dataclasses.dataclass
class _Event:
  name: str
  start: float     # microseconds
  end: float
  args: dict
  self_us: float = 0.0


def _with_self_time(events: list[_Event]) -> list[_Event]:
  """The op events of one thread, each with self_us: its duration less that of the ops nested
  in it. Other events (the CPU's rendezvous waits inside a collective) stay in their op's time."""
  events = sorted((e for e in events if 'hlo_op' in e.args), key=lambda e: (e.start, -e.end))
  stack: list[_Event] = []
  for e in events:
    e.self_us = e.end - e.start
    while stack and stack[-1].end <= e.start:
      stack.pop()
    if stack and e.end <= stack[-1].end:
      stack[-1].self_us -= e.end - e.start
    stack.append(e)
  return events


def summarize(trace_path: str, hlo_text: str | None = None, top: int = 25,
              steps: int | None = None) -> dict:
  """The per-device, per-module summary of one trace (see the module docstring).

  steps: executions per module where the trace does not number them (a GPU's events carry no
  run_id); by default the CPU's run_ids are counted, else 1 (and the summary says so).
  """
  with gzip.open(trace_path, 'rt', encoding='utf-8') as f:
    trace = json.load(f)
  events = trace.get('traceEvents', [])
  process_names = {e['pid']: e.get('args', {}).get('name', str(e['pid'])) for e in events
                   if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e and 'ts' in e:
      by_thread[(e['pid'], e.get('tid'))].append(
          _Event(e.get('name', ''), float(e['ts']), float(e['ts']) + float(e['dur']),
                 e.get('args') or {}))
  hlo = parse_hlo(hlo_text) if hlo_text else HloInfo('', {}, {})
  groups = collections.defaultdict(list)  # (device, module) -> op events
  for (pid, tid), thread_events in by_thread.items():
    process = process_names.get(pid, str(pid))
    on_device = '/device:' in process
    if on_device:
      # An accelerator's kernels without XLA's tag (a library's own kernel) count under their
      # own name.
      for e in thread_events:
        if not e.args.get('hlo_op'):
          e.args = dict(e.args, hlo_op=e.name, hlo_module=e.args.get('hlo_module', 'untagged'))
    for e in _with_self_time(thread_events):
      if not on_device and 'device_ordinal' not in e.args:
        continue  # the host launching a GPU kernel (CUPTI's copy of the kernel's tags)
      device = process
      if 'device_ordinal' in e.args:
        device = f'{device} device {e.args["device_ordinal"]}'
      groups[(device, e.args.get('hlo_module', '?'))].append(e)

  summaries = []
  for (device, module), ops in sorted(groups.items()):
    runs = collections.defaultdict(list)
    for e in ops:
      runs[e.args.get('run_id')].append(e)
    numbered = None not in runs
    executions = len(runs) if numbered else (steps or 1)
    spans = ([max(e.end for e in r) - min(e.start for e in r) for r in runs.values()]
             if numbered else [max(e.end for e in ops) - min(e.start for e in ops)])
    known = module == hlo.module  # the text describes this module's instructions only
    by_category = collections.Counter()
    by_phase = collections.Counter()
    per_op = collections.defaultdict(lambda: [0.0, 0])
    for e in ops:
      op = e.args['hlo_op']
      source = hlo.sources.get(op) if known else None
      kind = category(op)
      if kind == 'other':  # a custom call by its target, else the kernel by its own name
        kind = category(hlo.targets.get(op, '') if known else '')
        if kind == 'other':
          kind = category(e.name)
      by_category[kind] += e.self_us
      by_phase[phase(source)] += e.self_us
      # Instructions of one source are one row (layer_0's dot and layer_1's); without the text
      # each instruction is its own.
      key = (re.sub(r'\.\d+$', '', op) if source else op, _fold_layers(source) if source else '')
      per_op[key][0] += e.self_us
      per_op[key][1] += 1
    total_us = sum(e.self_us for e in ops)
    per_step = lambda us: us / 1e6 / executions
    summaries.append({
        'device': device, 'module': module, 'executions': executions,
        'executions_counted': numbered,
        'op_seconds_per_step': per_step(total_us),
        'span_seconds_per_step': sum(spans) / 1e6 / executions,
        'by_category': {c: per_step(by_category[c]) for c in CATEGORIES if by_category[c]},
        'by_phase': {p: per_step(v) for p, v in by_phase.most_common()},
        'top_ops': [{'op': op, 'source': source, 'seconds_per_step': per_step(us),
                     'calls_per_step': n / executions}
                    for (op, source), (us, n) in sorted(per_op.items(),
                                                        key=lambda kv: -kv[1][0])[:top]],
    })
  return {'trace': trace_path, 'hlo_module': hlo.module or None, 'modules': summaries}


NO_OPS = ('No XLA op events in the trace: run the step inside the trace (and block on its '
          'result before the trace ends); on a GPU, check that CUPTI loads (the profiler logs it).')


def format_summary(summary: dict, min_fraction: float = 0.01) -> str:
  """The summary as text: one block per device and module, longest modules first."""
  lines = [f'Profile: {summary["trace"]}']
  modules = sorted(summary['modules'], key=lambda m: -m['op_seconds_per_step'])
  if not modules:
    return '\n'.join(lines + [NO_OPS])
  longest = modules[0]['op_seconds_per_step']
  for m in modules:
    total = m['op_seconds_per_step']
    if total <= 0 or total < min_fraction * longest:
      continue
    counted = '' if m['executions_counted'] else ', as given: the trace does not number them'
    lines.append(f'\n{m["device"]}, {m["module"]} ({m["executions"]} executions{counted}): '
                 f'{total * 1e3:.2f} ms of ops per execution over a span of '
                 f'{m["span_seconds_per_step"] * 1e3:.2f} ms')
    for title, table in (('category', m['by_category']), ('phase', m['by_phase'])):
      cells = ', '.join(f'{k} {v * 1e3:.2f} ms ({v / total:.0%})' for k, v in table.items())
      lines.append(f'  by {title}: {cells}')
    lines.append('  top ops (ms per execution, calls):')
    for op in m['top_ops']:
      lines.append(f'    {op["seconds_per_step"] * 1e3:8.3f} {op["calls_per_step"]:6.1f}  '
                   f'{op["op"]:32s} {op["source"][:100]}')
  return '\n'.join(lines)


def profiler_options(python_tracer: bool = False) -> jax.profiler.ProfileOptions:
  """jax.profiler options: XLA's ops and the host's annotations, and the host's Python calls
  only when asked. They grow the trace, not the step time: the shakespeare_char recipe ran 20.1
  and 21.0 steps/s over 100 steps that held 20 traced ones, without and with them."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 1 if python_tracer else 0
  return options


def write_hlo(compiled, profile_dir: str, name: str) -> str:
  """Writes compiled.as_text() as PROFILE_DIR/NAME.hlo.txt (for --hlo); returns the path."""
  os.makedirs(profile_dir, exist_ok=True)
  path = os.path.join(profile_dir, f'{name}.hlo.txt')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(compiled.as_text())
  return path
