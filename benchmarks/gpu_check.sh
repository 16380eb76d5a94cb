#!/usr/bin/env bash
# GPU check in at most ~8 minutes of wall time: the LLaDA-8B-shape sampler (random bf16 weights)
# in every mode (shape: `docs/sampling.md` §3), the cuDNN attention vs XLA, and the update MFU
# of `llada_1b` in bf16. Writes JSON lines to $OUT/gpu_check.jsonl when OUT is set, else to
# stdout; progress lines ("# ...") go to stderr.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine
#   GPU_CHECK_PRESET=tiny GPU_CHECK_TRAIN_PRESET=tiny GPU_CHECK_BATCH=2 GPU_CHECK_PROMPT=8 \
#     GPU_CHECK_GEN=64 GPU_CHECK_STEPS=32 GPU_CHECK_TRAIN_BATCH=4 GPU_CHECK_TRAIN_PROMPT=8 \
#     GPU_CHECK_TRAIN_GEN=16 GPU_CHECK_ATTENTION="--seq=128 --heads=4 --head_dim=16 --batch=2 --pad=20" \
#     GPU_CHECK_ATTENTION_IMPLS=xla,splash bash benchmarks/gpu_check.sh   # the same run on CPU
#
# Steps, most important first (each under a hard `timeout`; a step that would not fit in the
# remaining budget is skipped and reported as such): machine, attention check, sampler modes
# standard + prefix_cache, then dual_cache + dual_cache+threshold, train step, sampler modes
# threshold / factor, then the standard sampler with XLA attention (the comparison for cuDNN).
# Sampler: batch 16, prompt 64, generation 256, block 32, 128 steps; one warm-up call, then the
# time of one call; compile time is reported apart (`benchmarks/sampler.py`). With random
# weights no confidence reaches the threshold, so threshold / factor decoding commits about one
# token per forward pass (256 passes): their time is an upper bound, their NFE pessimistic.
set -u
export PYTHONUNBUFFERED=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO" || exit 1

BUDGET_S=${GPU_CHECK_BUDGET_S:-465}
PRESET=${GPU_CHECK_PRESET:-llada_8b}
TRAIN_PRESET=${GPU_CHECK_TRAIN_PRESET:-llada_1b}
DTYPE=${GPU_CHECK_DTYPE:-bfloat16}
BATCH=${GPU_CHECK_BATCH:-16}
PROMPT=${GPU_CHECK_PROMPT:-64}
GEN=${GPU_CHECK_GEN:-256}
STEPS=${GPU_CHECK_STEPS:-128}
BLOCK=${GPU_CHECK_BLOCK:-32}
PEAK_TFLOPS=${GPU_CHECK_PEAK_TFLOPS:-989}   # H200 SXM dense bf16 (NVIDIA datasheet)
TRAIN_BATCH=${GPU_CHECK_TRAIN_BATCH:-8}
TRAIN_PROMPT=${GPU_CHECK_TRAIN_PROMPT:-128}
TRAIN_GEN=${GPU_CHECK_TRAIN_GEN:-256}
ATTENTION_ARGS=${GPU_CHECK_ATTENTION:---batch=4 --seq=1024 --heads=32 --head_dim=128 --pad=100}
ATTENTION_IMPLS=${GPU_CHECK_ATTENTION_IMPLS:-xla,cudnn}
CAP_SCALE=${GPU_CHECK_CAP_SCALE:-1}          # multiplies every step's cap (slow machines, CPU)

START=$(date +%s)
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  JSONL="$OUT/gpu_check.jsonl"
  : > "$JSONL"
else
  JSONL=/dev/stdout
fi

elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "# [$(elapsed)s] $*" >&2; }
emit() { echo "$1" >> "$JSONL"; }

# run_step NAME CAP_SECONDS MIN_SECONDS COMMAND...: JSON lines of COMMAND go to $JSONL, then a
# {"step": NAME, ...} line with its exit code and wall time.
run_step() {
  local name=$1 cap=$(( $2 * CAP_SCALE )) min=$3
  shift 3
  local left=$(( BUDGET_S - $(elapsed) - 5 ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt "$min" ]; then
    note "skip $name: ${left}s of the budget left, needs ${min}s"
    emit "{\"step\": \"$name\", \"skipped\": \"budget\", \"seconds_left\": $left}"
    return
  fi
  note "start $name (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" | grep --line-buffered '^{' >> "$JSONL"
  rc=${PIPESTATUS[0]}
  note "end $name: exit $rc after $(( $(date +%s) - t0 ))s"
  emit "{\"step\": \"$name\", \"exit_code\": $rc, \"timed_out\": $([ "$rc" -eq 124 ] && echo true || echo false), \"wall_s\": $(( $(date +%s) - t0 ))}"
}

SAMPLER=(python benchmarks/sampler.py "--preset=$PRESET" "--dtype=$DTYPE" "--batch=$BATCH"
         "--prompt_length=$PROMPT" "--gen_length=$GEN" "--block_length=$BLOCK" "--steps=$STEPS"
         --warmup=1 --repeats=1 "--peak_tflops=$PEAK_TFLOPS")

run_step machine 60 10 python -c "
import json, platform, subprocess, jax
gpu = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version', '--format=csv,noheader'],
                     capture_output=True, text=True).stdout.strip() if __import__('shutil').which('nvidia-smi') else None
print(json.dumps({'step_info': 'machine', 'jax': jax.__version__, 'backend': jax.default_backend(),
                  'devices': [d.device_kind for d in jax.devices()], 'nvidia_smi': gpu,
                  'python': platform.python_version(), 'preset': '$PRESET', 'train_preset': '$TRAIN_PRESET'}))"
# shellcheck disable=SC2086  # ATTENTION_ARGS is a list of flags
run_step attention 90 20 python benchmarks/attention.py "--impls=$ATTENTION_IMPLS" "--dtype=$DTYPE" $ATTENTION_ARGS
run_step sampler_standard_prefix 200 60 "${SAMPLER[@]}" --mode=standard,prefix_cache
run_step sampler_dual 140 45 "${SAMPLER[@]}" --mode=dual_cache,dual_cache+threshold
run_step train_step 180 60 python benchmarks/train_step.py "--preset=$TRAIN_PRESET" "--dtype=$DTYPE" \
    "--batch=$TRAIN_BATCH" "--prompt_length=$TRAIN_PROMPT" "--gen_length=$TRAIN_GEN" --n_mc=2 \
    --repeats=2 "--peak_tflops=$PEAK_TFLOPS"
run_step sampler_threshold 120 45 "${SAMPLER[@]}" --mode=threshold
run_step sampler_factor 120 45 "${SAMPLER[@]}" --mode=factor
run_step sampler_standard_xla_attention 90 45 "${SAMPLER[@]}" --mode=standard --attention_impl=xla
note "done in $(elapsed)s (budget ${BUDGET_S}s)"
