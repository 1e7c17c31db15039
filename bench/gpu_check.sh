#!/usr/bin/env bash
# One prepared GPU session check, sized for a single 10-minute call of the device tool:
#   bash bench/gpu_check.sh            (from the repository root; results under $OUT or ./runs)
# Each benchmark prints its own table (ratios against a baseline timed in the same run) and is
# cut off by `timeout` so one slow stage cannot eat the others' time. Nothing is installed:
# the device machine has no network, so it runs with the torch already there.
set -u
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"

stage() {  # stage NAME SECONDS CMD...: run CMD with a time limit, tee its output
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.txt"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
}

stage env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; \
  nproc; $PY -c 'import torch, numpy, cv2; print(torch.__version__, torch.version.cuda, \
  numpy.__version__, cv2.__version__)'"
# the whole loop on the GPU: the loss read every 5 steps, a NaN between reads named and stopped
stage train_smoke 90 "$PY" bench/train_smoke.py --device cuda --output runs/train_smoke
# ir50 and ir100 at batch 128, bf16, channels_last, eager: the reference figure
stage train_eager 120 "$PY" bench/train_throughput.py --device cuda
# torch.compile fuses BatchNorm/PReLU with their neighbours; CUDA graphs remove launch gaps
stage train_compile 150 "$PY" bench/train_throughput.py --device cuda --networks ir50 --compile
stage train_cudagraphs 100 "$PY" bench/train_throughput.py --device cuda --networks ir50 \
  --compile --compile-mode reduce-overhead
stage megaface_scoring 50 "$PY" bench/megaface_scoring_speed.py --device cuda --full
stage data_loader 50 "$PY" bench/data_throughput.py --workers 4 8 --raw-workers 4 8 \
  --ring-workers 4 8
echo "results: $OUT"
