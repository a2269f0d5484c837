#!/usr/bin/env bash
# The GPU section of docs/performance.md in a few device calls: the GPU tests, ResNet-50 bf16
# against its ceilings (CPU decode, then nvJPEG), Faster R-CNN against its model-only rate, and
# the model-only ceiling uncompiled (eager), to set the GPU's compile thresholds.
#
#   bash benchmarks/gpu/run.sh OUT STEP...     STEP: tests | classify | nvjpeg | detect | eager | all
#
# Run from the project root with the packages the GPU image lacks on PYTHONPATH
# (../shared/gpu/README.md). Each step writes its JSON and log under OUT. Sizes can be set with
# IMAGES (classification photos, default 20000) and DETECT_IMAGES (default 500); on a CPU-only
# machine the same steps run as a smoke test with small sizes. On an H200 with 16 cores
# (2026-12-04) tests took 68 s, classify 104 s and nvjpeg 52 s at IMAGES=10000, and detect 104 s
# at 500 images (1,000 did not finish in 90 s): all four fit one 10-minute call.
# With PACK=1 the steps write to a folder of their own and OUT gets one gzipped tar of it, made
# again after each step and at the end, each time written beside it and moved into place (the
# device tool brings back at most 8 files from its $OUT; the five steps write 9, and failed.txt).
set -euo pipefail
out=${1:?usage: run.sh OUT STEP...}
shift
mkdir -p "$out"
packed=""
if [[ -n ${PACK:-} ]]; then
  packed=$out/gpu-figures.tar.gz
  out=$(mktemp -d)
  chmod 755 "$out"
fi
python=${PYTHON:-python3}
images=${IMAGES:-20000}
detect_images=${DETECT_IMAGES:-500}
here=benchmarks/gpu
bench=("$python" -m vision_ops.cli bench --architecture resnet50 --no-s3 --workdir /tmp/vob-bench)

step() {
  case $1 in
    tests)
      "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.txt" ;;
    classify)
      "${bench[@]}" --images "$images" --only a,b,c --spec "$here/resnet50-bf16.yaml" \
        --out "$out/bench-resnet50-bf16.json" 2>&1 | tail -40 | tee "$out/bench-resnet50-bf16.txt" ;;
    nvjpeg)
      "${bench[@]}" --images "$images" --only c --spec "$here/resnet50-bf16-nvjpeg.yaml" \
        --out "$out/bench-resnet50-bf16-nvjpeg.json" 2>&1 | tail -40 \
        | tee "$out/bench-resnet50-bf16-nvjpeg.txt" ;;
    detect)
      local device=cpu
      "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && device=cuda
      "$python" benchmarks/detection.py --architecture fasterrcnn_resnet50_fpn_v2 \
        --device "$device" --autocast bfloat16 --images "$detect_images" --batch-size 16 \
        --out "$out/detection-fasterrcnn-v2.json" 2>&1 | tail -12 \
        | tee "$out/detection-fasterrcnn-v2.txt" ;;
    eager)
      "${bench[@]}" --images "$images" --only b --spec "$here/resnet50-bf16-eager.yaml" \
        --out "$out/bench-resnet50-bf16-eager.json" 2>&1 | tail -40 \
        | tee "$out/bench-resnet50-bf16-eager.txt" ;;
    *)
      echo "unknown step '$1': expected tests, classify, nvjpeg, detect, eager or all" >&2
      return 2 ;;
  esac
}

steps=("${@:-all}")
[[ ${steps[*]} == all ]] && steps=(tests classify nvjpeg detect eager)
failed=()
pack() {  # never stops the steps: a failed tar is said, the last good one kept
  [[ -z $packed ]] && return 0
  { tar czf "$packed.part" -C "$out" . && mv "$packed.part" "$packed"; } || echo "pack failed" >&2
}
trap pack EXIT  # (a step killed by a timeout's signal leaves only the steps before it)
for name in "${steps[@]}"; do
  step "$name" || failed+=("$name")  # go on: each step's figures stand alone
  pack
done
if ((${#failed[@]})); then
  echo "failed steps: ${failed[*]}" | tee "$out/failed.txt" >&2
  exit 1
fi
