#!/usr/bin/env bash
# GPU readiness check (issue #22): one prepared script for a lent GPU machine (one H200; see
# /work/.library/device/README.md) that fits in about 8 minutes and writes its results under $OUT.
#
# 1. Prepare, here (needs the package registry once):
#
#      bash benchmarks/gpu_check.sh prepare
#
#    puts into gpu_payload/ (ignored by git; shared with gpu_pretrain.sh, whose images it leaves alone): wheels/
#    (lightly, kornia, mmengine and its small pure dependencies, pytest: the versions installed here; the GPU image
#    has torch, timm, tensorboard, safetensors but not these), sdist/mmcv-2.1.0.tar.gz (mmcv's CUDA ops cannot come
#    from this CPU machine: they are built there), stubs/kornia_rs.
#
# 2. Run, on the GPU machine, through the device tool (one call):
#
#      run  command:   bash benchmarks/gpu_check.sh
#           carry:     ["gpu_payload"]
#           timeout_s: 540
#
#    Steps (each recorded, a failing one does not stop the others; the mmcv build runs in the background from the
#    start, capped at MMCV_BUILD_SECONDS, default 300):
#      versions.json        python, torch (+ its CUDA), GPU, library versions; the carried wheels
#      mmcv_build.json/.log mmcv 2.1.0 built with FORCE_CUDA=1 MMCV_WITH_OPS=1 for this GPU's architecture (skipped
#                           when a CUDA mmcv is installed; recorded as not built when there is no nvcc or time ran out)
#      ops.json             mmcv's compiled nms and sigmoid_focal_loss on the GPU, the focal loss in fp32/fp16/bf16,
#                           against plain PyTorch; the precision `auto` picks for a focal-loss detector
#      resume_{dino,ibot}.json, {dino,ibot}_*.log
#                           ViT-Base, batch 64 (2x224 + 6x96 crops): 8 steps straight, and 3 steps + resume to 8;
#                           the two exported encoders compared (bit-identical, or the largest difference)
#      pretrain_step.json   benchmarks/pretrain_step.py, ours against the reference (fp16 autocast + grad scaler)
#                           for vit_small and vit_base at batch 64
#      data_wait.log        ViT-Small pretraining on 512 synthetic fundus JPEGs decoded in loader workers
#                           (data.cache false, data.num_workers auto): the fraction of time the GPU waited for data
#      cuda_tests.json/.log the tests marked `cuda` (pytest -m cuda)
#      summary.json         all of it, with PASS/FAIL per check; the command exits 1 if a check failed
#
# CPU check of the same script, end to end with tiny sizes (vit_tiny, 32-pixel crops, batch 4; about 2 minutes on
# 2 cores; no payload needed, the .venv's packages are used):
#
#      OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh --cpu        # tests/test_gpu_check.py, acceptance gpu-ready
#
# Environment: PYTHON (default .venv/bin/python for --cpu where it exists, else python3), OUT (default ./gpu_out),
# MMCV_BUILD_SECONDS, KEEP_WORK=1 keeps the scratch folder.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
say() { printf '[gpu_check] %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
source "$REPO/benchmarks/gpu_lib.sh"

CPU=0 PAYLOAD="$REPO/gpu_payload"
case "${1:-}" in
  prepare) shift
           if [ -z "${PYTHON:-}" ]; then PYTHON=python3; [ -x "$REPO/.venv/bin/python" ] && PYTHON="$REPO/.venv/bin/python"; fi
           exec "$PYTHON" "$REPO/benchmarks/gpu_check.py" prepare "$@" ;;
  -h|--help|help) usage; exit 0 ;;
esac
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1; shift ;;
    --payload) PAYLOAD=$(cd "$2" && pwd); shift 2 ;;
    *) die "unknown option $1 (prepare, --cpu, --payload DIR; --help explains)" ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ "$CPU" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; fi
fi
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
MODE=gpu DEVICE=cuda
[ "$CPU" = 0 ] || { MODE=cpu DEVICE=cpu; }

# One step: its output to $OUT/<name>.log, its exit status noted; a failing step does not stop the others.
step() {
  local name=$1; shift
  local t0=$SECONDS rc=0
  say "step $name: $*"
  "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  say "step $name: exit $rc in $((SECONDS - t0)) s ($(tail -n 1 "$OUT/$name.log" | cut -c1-160))"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
  return 0
}

main() {
  local start=$SECONDS
  : >"$OUT/steps.tsv"
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/visionfm_gpu_check.XXXXXX")
  [ "${KEEP_WORK:-0}" = 1 ] || trap 'kill ${BUILD_PID:-} 2>/dev/null || true; rm -rf "$WORK"' EXIT
  local site="$WORK/site"
  mkdir -p "$site"
  if [ "$CPU" = 0 ]; then
    [ -d "$PAYLOAD/wheels" ] || die "no $PAYLOAD/wheels: run 'bash benchmarks/gpu_check.sh prepare' here and carry gpu_payload"
    install_payload_wheels "$PYTHON" "$PAYLOAD/wheels" "$site"
  fi
  export PYTHONPATH="$site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PYTHON" -c 'import kornia_rs' 2>/dev/null && [ -d "$PAYLOAD/stubs" ]; then
    PYTHONPATH="$PYTHONPATH:$PAYLOAD/stubs"  # kornia.io only; nothing here reads files through kornia
  fi
  export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
  step versions "$PYTHON" "$REPO/benchmarks/gpu_corpus.py" env --device "$DEVICE" --site "$site" --json "$OUT/versions.json"
  if [ "$CPU" = 0 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader >"$OUT/nvidia-smi.txt" 2>&1 || true
  fi

  # mmcv with CUDA ops: in the background while the GPU trains (it uses the CPUs; the data-wait step comes after)
  BUILD_PID=""
  local has_cuda_mmcv=0
  if [ "$CPU" = 0 ]; then
    "$PYTHON" "$REPO/benchmarks/gpu_check.py" ops --device cuda --json "$WORK/probe_ops.json" >/dev/null 2>&1 &&
      "$PYTHON" -c 'import json,sys; o=json.load(open(sys.argv[1]))["ops"]; sys.exit(0 if o.get("nms",{}).get("ok") else 1)' \
        "$WORK/probe_ops.json" 2>/dev/null && has_cuda_mmcv=1
    local nvcc=""
    nvcc=$(command -v nvcc || true)
    [ -n "$nvcc" ] || { [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; } || true
    local sdist
    sdist=$(ls "$PAYLOAD"/sdist/mmcv-*.tar.gz 2>/dev/null | head -n 1 || true)
    if [ "$has_cuda_mmcv" = 1 ]; then
      printf '{"built": false, "reason": "a CUDA mmcv is already installed"}\n' >"$OUT/mmcv_build.json"
    elif [ -z "$nvcc" ]; then
      printf '{"built": false, "reason": "no nvcc on this machine: mmcv CUDA ops cannot be built (a CUDA mmcv wheel for this torch would have to be carried)"}\n' >"$OUT/mmcv_build.json"
    elif [ -z "$sdist" ]; then
      printf '{"built": false, "reason": "no mmcv sdist in the payload (bash benchmarks/gpu_check.sh prepare)"}\n' >"$OUT/mmcv_build.json"
    else
      (
        set +e
        b="$WORK/mmcv_build"; mkdir -p "$b"; tar -xzf "$sdist" -C "$b"; src=$(ls -d "$b"/mmcv-*/)
        sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"  # torch >= 2.10's headers need C++20 (as scripts/setup.sh)
        arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
        t0=$SECONDS
        (cd "$src" && FORCE_CUDA=1 MMCV_WITH_OPS=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) \
          timeout "${MMCV_BUILD_SECONDS:-300}" "$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-cache-dir \
          -w "$b/dist" . >"$OUT/mmcv_build.log" 2>&1)
        rc=$?
        whl=$(ls "$b"/dist/mmcv-*.whl 2>/dev/null | head -n 1)
        if [ -n "$whl" ]; then
          "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" "$whl" >>"$OUT/mmcv_build.log" 2>&1
          printf '{"built": true, "seconds": %d, "arch": "%s", "nvcc": "%s"}\n' $((SECONDS - t0)) "$arch" "$nvcc" >"$OUT/mmcv_build.json"
        else
          printf '{"built": false, "exit": %d, "seconds": %d, "reason": "build failed or passed MMCV_BUILD_SECONDS (see mmcv_build.log)"}\n' \
            "$rc" $((SECONDS - t0)) >"$OUT/mmcv_build.json"
        fi
      ) &
      BUILD_PID=$!
      say "building mmcv with FORCE_CUDA=1 in the background (pid $BUILD_PID, cap ${MMCV_BUILD_SECONDS:-300} s)"
    fi
  fi

  # Sizes: ViT-Base at batch 64 on the GPU; tiny on the CPU.
  local common
  if [ "$CPU" = 1 ]; then
    common=(--modality cfp --device cpu --arch vit_tiny --batch-size 4 --img-size 32 --local-size 16 --local-crops 2
            --out-dim 64 --epochs 2 --set head.hidden_dim=64 --set head.bottleneck_dim=32 --set data.load_size=40
            --set data.synthetic_count=16 --set train.threads=1 --set train.log_every=2)
  else
    common=(--modality cfp --device cuda --arch vit_base --batch-size 64 --epochs 2 --set data.synthetic_count=256
            --set train.log_every=4)
  fi
  for objective in dino ibot; do
    step "${objective}_straight" "$PYTHON" pretrain/dino.py "${common[@]}" --objective "$objective" \
      --output "$WORK/${objective}_straight" --max-steps 8
    step "${objective}_part1" "$PYTHON" pretrain/dino.py "${common[@]}" --objective "$objective" \
      --output "$WORK/${objective}_resumed" --max-steps 3
    step "${objective}_part2" "$PYTHON" pretrain/dino.py "${common[@]}" --objective "$objective" \
      --output "$WORK/${objective}_resumed" --max-steps 8
    step "resume_${objective}_compare" "$PYTHON" "$REPO/benchmarks/gpu_check.py" compare \
      "$WORK/${objective}_straight/encoder.safetensors" "$WORK/${objective}_resumed/encoder.safetensors" \
      --json "$OUT/resume_${objective}.json"
  done

  if [ "$CPU" = 1 ]; then
    step pretrain_step "$PYTHON" benchmarks/pretrain_step.py --device cpu --threads 1 --arch vit_tiny --batch-size 4 \
      --global-size 32 --local-size 16 --local-crops 2 --out-dim 256 --repeats 1 --json "$OUT/pretrain_step.json"
  else
    step pretrain_step "$PYTHON" benchmarks/pretrain_step.py --device cuda --arch vit_small vit_base --batch-size 64 \
      --repeats 5 --json "$OUT/pretrain_step.json"
  fi

  if [ -n "$BUILD_PID" ]; then
    say "waiting for the mmcv build"
    wait "$BUILD_PID" || true
    BUILD_PID=""
  fi
  step ops "$PYTHON" "$REPO/benchmarks/gpu_check.py" ops --device "$DEVICE" --json "$OUT/ops.json"

  # Data wait with JPEG decoding in loader workers (after the build, which would compete for the CPUs).
  if [ "$CPU" = 1 ]; then
    step jpegs "$PYTHON" "$REPO/benchmarks/gpu_check.py" jpegs --out "$WORK/jpegs" --count 12 --size 64
    step data_wait "$PYTHON" pretrain/dino.py "${common[@]}" --data "$WORK/jpegs" --output "$WORK/data_wait" \
      --max-steps 3 --set data.cache=false --set data.num_workers=2
  else
    step jpegs "$PYTHON" "$REPO/benchmarks/gpu_check.py" jpegs --out "$WORK/jpegs" --count 512 --size 512
    step data_wait "$PYTHON" pretrain/dino.py --modality cfp --device cuda --arch vit_small --batch-size 64 --epochs 2 \
      --data "$WORK/jpegs" --output "$WORK/data_wait" --max-steps 12 --set data.cache=false --set data.load_size=256 \
      --set train.log_every=0
  fi

  step cuda_tests "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/test_gpu_path.py
  "$PYTHON" -c '
import json, re, sys
text = open(sys.argv[1], errors="replace").read()
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
rc = [l.split("\t") for l in open(sys.argv[2]) if l.startswith("cuda_tests\t")][-1][1]
ok = None if sys.argv[3] == "cpu" else (int(rc) == 0 and counts.get("passed", 0) > 0)
json.dump({"ok": ok, "exit": int(rc), **counts}, open(sys.argv[4], "w"))
' "$OUT/cuda_tests.log" "$OUT/steps.tsv" "$MODE" "$OUT/cuda_tests.json" || true

  local rc=0
  "$PYTHON" "$REPO/benchmarks/gpu_check.py" summary --out "$OUT" --mode "$MODE" || rc=$?
  say "done in $((SECONDS - start)) s (exit $rc)"
  return "$rc"
}

main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
