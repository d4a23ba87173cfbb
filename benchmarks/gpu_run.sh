#!/usr/bin/env bash
# Build, test and benchmark fastdg on a GPU machine in one go.
#
#   bash benchmarks/gpu_run.sh [build] [tests] [bench] [round]     (default: build tests bench)
#
# build  compiles fastdg._C in place for the local GPU (no network, no pip download needed)
# tests  runs the whole test suite with the GPU present (gpu-marked tests included)
# bench  runs bench_bin, bench_group_loss and bench_kmeans (bench_loader too when DALI imports)
# round  runs bench_round (RotatedMNIST, and PACS/ResNet-50 when the data is present)
#
# Results go to $OUT (default ./gpu-out): log.txt, tests.xml and one bench_<op>.json per
# benchmark, each stamped with the device, torch/triton/CUDA versions, the commit and the
# command (benchmarks/stamp_results.py). Copy them to benchmarks/results/<device>/ and commit.
# Data: FASTDG_DATA (e.g. a carried, unpacked subset of ../shared/data). Where the copy of the tree
# has no .git, pass the commit: FASTDG_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_run.sh ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests bench)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
status=0

has() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
run() { echo "+ $*" | tee -a "$LOG"; "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && status=1; return "$rc"; }

run nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if has build; then
  arch=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
  FASTDG_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} run $PY setup.py -q build_ext --inplace
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run $PY -m fastdg.info
if has tests; then
  run $PY -m pytest tests -q -x --junitxml="$OUT/tests.xml" -p no:cacheprovider
fi
bench() {  # bench NAME: one benchmark file to one stamped JSON
  local name=$1 json="$OUT/bench_$1.json"
  local cmd=("$PY" -m pytest "benchmarks/bench_$name.py" -q -p no:cacheprovider --benchmark-json="$json"
             --benchmark-columns=median,iqr,rounds)
  run "${cmd[@]}"
  [ -f "$json" ] && run $PY benchmarks/stamp_results.py "$json" "bash benchmarks/gpu_run.sh ${stages[*]} -> ${cmd[*]}"
}
if has bench; then
  bench bin
  bench group_loss
  bench kmeans
  # GPU ("mixed") decoding: the bench defaults to CPU decoding, the target is the GPU pipeline.
  if $PY -c "import nvidia.dali" 2>/dev/null; then FASTDG_BENCH_DEVICE=cuda bench loader; else echo "bench_loader skipped: DALI not importable" | tee -a "$LOG"; fi
fi
if has round; then
  bench round
fi
echo "gpu_run: exit status $status" | tee -a "$LOG"
exit $status
