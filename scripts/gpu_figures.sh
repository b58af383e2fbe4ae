#!/usr/bin/env bash
# The README's GPU figures (issue 22), in one go on one GPU: the SD 1.5-shaped train step at
# 512 px in bf16 with random weights (builtin:random-sd15), XLA vs cuDNN attention; then the
# paper's whole run (200 class images, 800 steps, export, samples) timed end to end.
#   bash scripts/gpu_figures.sh [out_dir]
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_figures}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export DREAMBOOTH_JAX_CACHE=${DREAMBOOTH_JAX_CACHE:-/tmp/dreambooth_jax_cache}
sd15=(--config=configs/sd15.py --config.model.pretrained=builtin:random-sd15)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$out/machine.txt"
for attention in xla cudnn; do
  start=$SECONDS
  timeout 170 python3 -m dreambooth_jax.benchmark "${sd15[@]}" --config.model.attention=$attention \
      --warmup_steps=3 --timed_steps=20 2>&1 | grep -v "it/s\]" | tail -20 | tee "$out/step_$attention.txt"
  echo "wall_seconds: $((SECONDS - start))" | tee -a "$out/step_$attention.txt"
done
start=$SECONDS
timeout ${PAPER_RUN_TIMEOUT:-1800} python3 -m dreambooth_jax.main "${sd15[@]}" --config.data.instance_dir=builtin:demo-toy \
    --config.data.class_name=toy --workdir=/tmp/paper_run 2>&1 | grep -v "it/s\]" | tail -25 \
    | tee "$out/paper_run.txt"
echo "paper_run_wall_seconds: $((SECONDS - start))" | tee -a "$out/paper_run.txt"
tail -3 /tmp/paper_run/metrics.jsonl >> "$out/paper_run.txt" 2>/dev/null
