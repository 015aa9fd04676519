#!/usr/bin/env bash
# Weak scaling on one host: the same per-GPU batch on each GPU count, FSDP over all of them, LiteSpark and the
# baseline in one process per count (python -m litespark_jax.bench), rows appended to a JSONL file.
#
#   launch/bench_weak_scaling.sh 1 2 4 8            # GPU counts; results in weak-scaling.jsonl
#   OUT=runs/ws.jsonl CONFIG=configs/llama-3.2-3b.yaml PER_GPU=6 BASE_PER_GPU=4 STEPS=6 launch/bench_weak_scaling.sh 1 2
#
# PER_GPU / BASE_PER_GPU: sequences per GPU for LiteSpark / the baseline (the 3B preset's 6 and the 4 that fits the
# baseline's memory on an 80 GB card). A count that fails (out of memory, TIMEOUT seconds) is reported and skipped.
set -u
[ $# -ge 1 ] || { echo "usage: $0 NUM_GPUS [NUM_GPUS ...]" >&2; exit 2; }
config=${CONFIG:-configs/llama-3.2-3b.yaml}
out=${OUT:-weak-scaling.jsonl}
per_gpu=${PER_GPU:-6}
base_per_gpu=${BASE_PER_GPU:-4}
steps=${STEPS:-6}
# The first N of the GPUs this job may use: those the scheduler listed in CUDA_VISIBLE_DEVICES, else 0, 1, ...
IFS=, read -r -a granted <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 63)}"
status=0
for n in "$@"; do
  echo "## $n GPU(s): $config, $per_gpu (baseline $base_per_gpu) sequences per GPU, mesh.fsdp=$n"
  if [ "$n" -gt "${#granted[@]}" ]; then
    echo "## $n GPU(s): only ${#granted[@]} listed in CUDA_VISIBLE_DEVICES; skipped"; status=1; continue
  fi
  visible=$(IFS=,; echo "${granted[*]:0:$n}")
  CUDA_VISIBLE_DEVICES=$visible timeout "${TIMEOUT:-420}" \
    python -m litespark_jax.bench --config "$config" --baseline --steps "$steps" --warmup 2 --jsonl "$out" \
      mesh.fsdp="$n" train.global_batch_size=$((base_per_gpu * n)) \
      --litespark train.global_batch_size=$((per_gpu * n)) || { echo "## $n GPU(s): exit $?"; status=1; }
done
exit $status
