#!/usr/bin/env bash
# Issue 20's GPU measurements in one call of the device tool (a lent GPU has 15 minutes in all,
# its start included, so everything runs in one prepared command of at most 9 minutes).
#
#   bash benchmarks/gpu_session.sh pack    # here, once: .gpu/ = ptbxl-subset-1819 (xz, 32 MB) +
#                                          # wheels of mvkt's dependencies the device image lacks
#   device run: command="bash benchmarks/gpu_session.sh run", carry=[".gpu"], timeout_s=600
#
# The subset is packed because ../shared does not travel to the device (.gpu/ is git-ignored). `run` writes into $OUT
# (.gpu/out when unset): gpu_session.log, gpu_check.json (the backend, and mvkt.cpu_conv's kernels
# counted in each net's traced loss: all 0 where XLA's own convolutions run),
# end_to_end_host_gpu.json (the host cost per step: a trivial step on the full-size tiled data on
# the devices, K=1 and K=10), dispatch_calls_gpu.json (the same as medians per call),
# end_to_end_gpu.json (the 20-epoch subset teacher, K=1 and K=10) and
# train_step_gpu.json (the step table at batch 128, PyTorch on the same GPU); about 9 minutes.
# Each benchmark rewrites its JSON after every row and runs under its own time limit, so a cut
# run keeps what it measured. Copy the files to benchmarks/results/ and the tables to
# docs/BENCHMARKS.md.
#
# Environment: PYTHON (default python3: the device image's, with torch), E2E_EPOCHS (20),
# E2E_TILED_EPOCHS (2), E2E_HOST_LIMIT_S (140), CALLS_LIMIT_S (60), E2E_LIMIT_S (200),
# STEP_LIMIT_S (130), STEP_ARCHS,
# STEP_CONFIGS (each *_LIMIT_S is a hard limit in seconds; the rows done by then are kept).
set -euo pipefail
cd "$(dirname "$0")/.."

PACK=.gpu
PYTHON=${PYTHON:-python3}
# The dependencies missing from the device image (its package list: .library/device/KINDS.md),
# at the versions of requirements.lock, for its Python 3.12.
WHEELS=(wfdb edfio ml-collections tensorboardx soundfile cffi pycparser)

pack() {
  local subset=${SUBSET:-../shared/datasets/ptbxl-subset-1819}
  [[ -f "$subset/ptbxl_database.csv" ]] || { echo "no PTB-XL subset at $subset (set SUBSET)" >&2; exit 1; }
  rm -rf "$PACK" && mkdir -p "$PACK/wheels"
  local pins=()
  for name in "${WHEELS[@]}"; do
    pins+=("$(grep -iE "^${name}==" requirements.lock | awk '{print $1}')")
  done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$PACK/wheels" "${pins[@]}"
  tar -C "$subset" -cJf "$PACK/subset.tar.xz" ptbxl_database.csv scp_statements.csv records100
  du -sh "$PACK"/subset.tar.xz "$PACK"/wheels && du -sh "$PACK"
}

run() {
  local out=${OUT:-$PACK/out}
  mkdir -p "$out"
  exec > >(tee "$out/gpu_session.log") 2>&1
  export PYTHONUNBUFFERED=1
  if ! "$PYTHON" -c "import wfdb, edfio, ml_collections, tensorboardX" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/mvkt-site "$PACK"/wheels/*.whl
    export PYTHONPATH=/tmp/mvkt-site
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  local subset=/tmp/mvkt-gpu/subset
  rm -rf /tmp/mvkt-gpu && mkdir -p "$subset"
  tar -C "$subset" -xJf "$PACK/subset.tar.xz"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" -c "import jax, flax, optax, orbax.checkpoint as o, numpy; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__, jax.devices())"

  echo "== convolutions on this backend"
  timeout 120 "$PYTHON" -m benchmarks.gpu_check > "$out/gpu_check.json" || echo "gpu_check failed: $?"
  cat "$out/gpu_check.json"

  # The host cost per step first: it decides the issue's device-busy target.
  echo "== host cost per step, trivial step on the full-size data (benchmarks/end_to_end.py)"
  timeout "${E2E_HOST_LIMIT_S:-140}" "$PYTHON" -m benchmarks.end_to_end --subset="$subset" --work=/tmp/mvkt-gpu/e2e \
    --workloads=tiled_teacher_trivial_device,tiled_teacher_trivial_device_k10 \
    --tiled_epochs="${E2E_TILED_EPOCHS:-2}" --settle_s=0 --out="$out/end_to_end_host_gpu.json" \
    || echo "end_to_end (host cost) stopped: $?"

  echo "== host work per call, medians (benchmarks/dispatch_calls.py)"
  timeout "${CALLS_LIMIT_S:-60}" "$PYTHON" -m benchmarks.dispatch_calls --data=/tmp/mvkt-gpu/e2e/shards_tiled \
    --epochs=1 --settle_s=0 --out="$out/dispatch_calls_gpu.json" || echo "dispatch_calls stopped: $?"

  echo "== whole runs (benchmarks/end_to_end.py)"
  timeout "${E2E_LIMIT_S:-200}" "$PYTHON" -m benchmarks.end_to_end --subset="$subset" --work=/tmp/mvkt-gpu/e2e \
    --workloads=subset_teacher,subset_teacher_k10 --epochs="${E2E_EPOCHS:-20}" --settle_s=0 \
    --out="$out/end_to_end_gpu.json" || echo "end_to_end stopped: $?"

  echo "== train step (benchmarks/train_step.py)"
  timeout "${STEP_LIMIT_S:-130}" "$PYTHON" benchmarks/train_step.py --archs="${STEP_ARCHS:-resnet1d_wang,xresnet1d50}" \
    --configs="${STEP_CONFIGS:-teacher_bce,mvkt_memory_bank}" --repeats=5 --steps=20 --settle_s=0 \
    --out="$out/train_step_gpu.json" || echo "train_step stopped: $?"
  ls -la "$out"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_session.sh pack|run" >&2; exit 2 ;;
esac
