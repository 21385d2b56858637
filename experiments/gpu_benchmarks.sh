#!/bin/bash
# The GPU figures of experiments/benchmark.py, in one go, on a lent H100/H200. Each run takes
# 2-2.5 minutes there (on the lent H200's image, 2026-12-04, XLA compiled GPT-2 small's train step
# in 69-73 s), so the whole list takes about 30: BUDGET_S caps it, most important runs first.
#
#   bash experiments/gpu_benchmarks.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else /tmp/bench_out
#
# Writes OUT_DIR/results.jsonl (one benchmark JSON per line, appended as each run ends, so a
# cut-short session keeps what finished), OUT_DIR/log.txt (everything printed) and
# OUT_DIR/env.txt (GPU, driver, package versions).
#
# The lent machine reaches no package registry, so nothing is pip-installed from one: the script
# runs on the image's python3 (its jax with the CUDA plugin, torch with CUDA, transformers, flax,
# optax). ptm_jax is imported from this checkout (the current directory). The one runtime package
# the image lacks, ml_collections (pure Python), comes as a wheel in .whl/ (carry '.whl'):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0
#
# Runs, most important first; each has a time limit, a failed run does not stop the others, and
# no run starts when too little of the budget is left:
#   1. GPT-2 small train, bf16, cuDNN fused attention, 16 x 1024 tokens (MFU target: 45%), profiled,
#      against the torch peer at the same shape
#   2. ViT-B/16 train, bf16, XLA attention (cuDNN refuses 197 tokens), 128 images (MFU target:
#      40%), profiled, against the torch peer
#   3. what was tried on the MFU misses: GPT-2 with its tied table unpadded (50,257 rows,
#      --vocabulary_multiple=1; the default pads it to 50,304); GPT-2 at 32 x 1024; GPT-2 with XLA's Triton GEMMs off (cuBLAS
#      for every dot); ViT at 256 images
#   4. gpt2 / bert / vit / resnet at the issue's default shapes, train then infer, bf16, each
#      against the transformers peer (torch autocast bf16)
# The torch peer runs wherever torch sees the GPU, except in the runs of 3.

set -u
set -x
OUT_DIR="${1:-${OUT:-/tmp/bench_out}}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/log.txt") 2>&1

BUDGET_S=${BUDGET_S:-540}        # the whole script, seconds
RUN_LIMIT_S=${RUN_LIMIT_S:-240}  # one run at most
MIN_START_S=40                   # do not start a run with less than this left
START=$(date +%s)
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # torch shares the GPU in the same process
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}

# --- Environment ---------------------------------------------------------------------------------
if ! $PY -c 'import ml_collections' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "ml_collections is missing and no .whl/ was carried: the runs will fail to import."
  fi
fi
{
  nvidia-smi || true
  $PY - <<'EOF'
import importlib
for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers', 'ml_collections'):
  try:
    print(name, importlib.import_module(name).__version__)
  except Exception as e:  # report and go on: the runs say what breaks
    print(name, 'unavailable:', e)
import jax
print('jax devices:', jax.devices())
import torch
print('torch cuda:', torch.cuda.is_available(), torch.version.cuda)
EOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

PEER=--peer=torch
$PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || PEER=

# --- Runs ----------------------------------------------------------------------------------------
bench() {  # [NO_PEER=1] bench NAME ARGS...: one benchmark under the time limits; appends its JSON.
  local name=$1; shift
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < MIN_START_S )); then
    echo "SKIPPED $name: ${left}s of the budget left"; return
  fi
  local limit=$(( left < RUN_LIMIT_S ? left : RUN_LIMIT_S ))
  local json="/tmp/bench_$name.json"
  local peer=$PEER
  [[ -n "${NO_PEER:-}" ]] && peer=
  rm -f "$json"
  timeout -k 5 "$limit" $PY -m experiments.benchmark "$@" $peer --json_out="$json"
  local rc=$?
  if [[ $rc -eq 0 && -s "$json" ]]; then
    $PY -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$json" \
        >> "$OUT_DIR/results.jsonl"
    echo "DONE $name"
  else
    echo "FAILED $name (exit $rc; 124 = time limit)"
  fi
  return $rc
}

# A cuDNN run that fails (an unsupported shape, say) is retried with XLA's attention.
bench_cudnn() {
  local name=$1; shift
  bench "$name" "$@" --attention=cudnn || {
    local rc=$?
    (( rc != 124 )) && bench "${name}_xla" "$@" --attention=xla
  }
}

# The two MFU runs also trace 3 steps: their summary (op time by category and phase, the top
# kernels; ptm_jax/train/profiling.py) is printed into log.txt and recorded in the JSON. The trace
# and the compiled step's text are copied to OUT_DIR/NAME/ (jax.profiler writes the trace folders
# deep, deeper than what comes back from a lent machine), for
# `python -m experiments.profile_summary --profile_dir=OUT_DIR/NAME --steps=3`.
keep_trace() {  # keep_trace NAME: the newest trace under /tmp/profile_NAME, and its HLO, copied.
  local trace
  trace=$(ls -t "/tmp/profile_$1"/plugins/profile/*/*.trace.json.gz 2>/dev/null | head -1)
  [[ -n "$trace" ]] || return 0
  mkdir -p "$OUT_DIR/$1"
  cp "$trace" "$OUT_DIR/$1/step.trace.json.gz"
  cp /tmp/profile_"$1"/*.hlo.txt "$OUT_DIR/$1/" 2>/dev/null
  return 0
}
GPT2_MFU=(--model=gpt2 --size=small --mode=train --dtype=bfloat16 --batch_size=16 --seq_len=1024
          --steps=10 --warmup=3)
VIT_MFU=(--model=vit --size=b16 --mode=train --dtype=bfloat16 --batch_size=128 --steps=10
         --warmup=3 --attention=xla)
bench_cudnn gpt2_train_mfu "${GPT2_MFU[@]}" --profile_dir=/tmp/profile_gpt2
keep_trace gpt2
bench vit_train_mfu "${VIT_MFU[@]}" --profile_dir=/tmp/profile_vit
keep_trace vit

# What was tried on the misses (ours alone).
NO_PEER=1 bench gpt2_train_mfu_unpadded "${GPT2_MFU[@]}" --attention=cudnn \
    --vocabulary_multiple=1
NO_PEER=1 bench gpt2_train_mfu_b32 "${GPT2_MFU[@]/--batch_size=16/--batch_size=32}" \
    --attention=cudnn
NO_PEER=1 bench gpt2_train_mfu_cublas "${GPT2_MFU[@]}" --attention=cudnn \
    --xla_flags=--xla_gpu_enable_triton_gemm=false
NO_PEER=1 bench vit_train_mfu_b256 "${VIT_MFU[@]/--batch_size=128/--batch_size=256}"

for mode in train infer; do
  bench_cudnn "gpt2_$mode" --model=gpt2 --mode=$mode --dtype=bfloat16 --steps=10 --warmup=3
  bench_cudnn "bert_$mode" --model=bert --mode=$mode --dtype=bfloat16 --steps=10 --warmup=3
  bench "vit_$mode" --model=vit --mode=$mode --dtype=bfloat16 --steps=10 --warmup=3 \
      --attention=xla
  bench "resnet_$mode" --model=resnet --mode=$mode --dtype=bfloat16 --steps=10 --warmup=3
done

echo "total $(( $(date +%s) - START ))s; results in $OUT_DIR/results.jsonl"
exit 0
