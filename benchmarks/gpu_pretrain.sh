#!/usr/bin/env bash
# A prepared pretraining run on a lent GPU machine (one H200; see /work/.library/device/README.md), in two steps.
#
# 1. Prepare, here (CPU; needs the data and, once, the package registry for two wheels):
#
#      bash benchmarks/gpu_pretrain.sh prepare --modality cfp [--data-root ../shared/data] [--budget-mib MiB] [--limit N]
#
#    writes gpu_payload/ (ignored by git; one modality at a time, a second prepare replaces the images):
#      images/<source>/*.jpg  the modality's pretraining corpus (cfp: EyeDisease4:train,TVHL:cfp,DRIVE:train,
#                             IDRiD:train,OCT_DME:train; oct: TVHL:oct,OCT_DME:train; training splits only) as JPEG,
#                             fundus as its central square (what the trainer keeps), B-scans stretched to a fixed
#                             frame, at the largest size (then quality) that fits the budget: cfp 384..224 px
#                             square, oct 640x256..560x224, quality 90 (lower only at the smallest size)
#      images.csv             their relative paths (a --data CSV); MANIFEST (source, count, size, bytes);
#                             payload.json (the same, read by `run`)
#      wheels/                lightly and kornia (pure Python, the versions installed here; the GPU image lacks them)
#      stubs/kornia_rs/       kornia imports the binary kornia_rs only in kornia.io, which pretraining never calls;
#                             the stub saves its 5 MiB per Python version (--kornia-rs-wheel carries the real cp312
#                             wheel; installed, it takes precedence)
#    The default budget is what a device call's 64 MiB leaves beside the working tree (tracked + untracked files,
#    about 30 MiB), less 1.5 MiB, at most 40 MiB; prepare prints the payload size and refuses to exceed 64 MiB.
#
# 2. Run, on the GPU machine, through the device tool (one call, about 7.5 minutes of the 15 lent):
#
#      run  command:   bash benchmarks/gpu_pretrain.sh run --modality cfp --objective ibot --arch vit_small --seconds 360
#           carry:     ["gpu_payload"]
#           timeout_s: 540
#
#    (--objective dino | ibot | mae; --modality must be the prepared one.) It installs the carried wheels with
#    `python3 -m pip install --no-index --no-deps --target <tmp>/site` into the image's python3 (its CUDA torch, timm,
#    tensorboard and safetensors are used), prints the versions and checks that the pretraining import path loads
#    without mmcv/mmseg/mmdet, runs a 12-step probe (step time and per-epoch checkpoint cost), plans the number of
#    epochs whose whole schedule (warm-up, cosine) fits --seconds, and runs pretrain/dino.py (pretrain/mae.py) on
#    gpu_payload/images.csv with --device cuda, train.max_seconds=<seconds> as the hard stop, a GPU batch (256;
#    MAE 512; halved while an epoch would have under 6 steps: oct 128/256), data.num_workers=4, data.load_size =
#    the stored size. The run folder lives in /dev/shm (per-epoch checkpoints without disk flushes). Into $OUT
#    (./gpu_out when unset): summary.json (the run's summary, plan, versions, payload, encoder sha256), config.yaml,
#    run.log (everything printed), tensorboard.tar and the encoder
#    in fp16: encoder.safetensors, or encoder.safetensors.part0.. when larger than 15 MiB (a ViT-S is 43 MiB in
#    fp16; fp32 would not come back: 16 MiB per file, 64 MiB in all). Whole command: about 7.5 minutes on an H200
#    with --seconds 360 (start-up, wheel install, probe, decoding and export take about 1.5 minutes).
#    Arguments after `--` go to both pretraining commands last (e.g. `-- --set head.out_dim=16384`).
#
# 3. Bring the encoder back and evaluate it (here; <files_at> is the reply's files_at folder):
#
#      .venv/bin/python benchmarks/gpu_corpus.py join <files_at> --output runs/gpu_cfp_ibot/encoder.safetensors
#      .venv/bin/python benchmarks/transfer.py --modality cfp --data-root ../shared/data \
#          --weights runs/gpu_cfp_ibot/encoder.safetensors --json runs/gpu_cfp_ibot/transfer.json
#
#    (join concatenates the parts, checks the sha256 recorded in summary.json, copies summary.json and config.yaml.)
#
# CPU check of the whole run path (tiny: vit_tiny, 32-pixel crops, 16 images, a few steps, no GPU):
#
#      bash benchmarks/gpu_pretrain.sh run --modality cfp --objective ibot --cpu      # tests/test_gpu_pretrain.py
#
# Environment: PYTHON (default .venv/bin/python where it exists, else python3), OUT, KEEP_WORK=1 keeps the
# scratch folder (run folders, probe, installed wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
say() { printf '[gpu_pretrain] %s\n' "$*"; }
source "$REPO/benchmarks/gpu_lib.sh"
die() { printf 'error: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

[ $# -ge 1 ] || { usage; exit 2; }
cmd=$1; shift
case "$cmd" in
  prepare) exec "$PYTHON" "$REPO/benchmarks/gpu_corpus.py" prepare "$@" ;;
  run) ;;
  -h|--help|help) usage; exit 0 ;;
  *) die "unknown step '$cmd' (prepare or run; --help explains)" ;;
esac

MODALITY="" OBJECTIVE=ibot ARCH=vit_small SECONDS_BUDGET=360 BATCH="" WORKERS="" CPU=0
PAYLOAD="$REPO/gpu_payload" PART_MIB=15 EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --modality) MODALITY=$2; shift 2 ;;
    --objective) OBJECTIVE=$2; shift 2 ;;
    --arch) ARCH=$2; shift 2 ;;
    --seconds) SECONDS_BUDGET=$2; shift 2 ;;
    --batch-size) BATCH=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --payload) PAYLOAD=$(cd "$2" && pwd); shift 2 ;;
    --part-mib) PART_MIB=$2; shift 2 ;;
    --cpu) CPU=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1" ;;
  esac
done
[ -n "$MODALITY" ] || die "--modality is required"
case "$OBJECTIVE" in dino|ibot|mae) ;; *) die "--objective must be dino, ibot or mae" ;; esac
[ -f "$PAYLOAD/payload.json" ] || die "no payload in $PAYLOAD: run 'bash benchmarks/gpu_pretrain.sh prepare --modality $MODALITY' first"

OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

main() {
  local start=$SECONDS
  local info count height width
  info=$("$PYTHON" -c 'import json,sys; p=json.load(open(sys.argv[1])); print(p["modality"], p["count"], *p["size"])' \
         "$PAYLOAD/payload.json")
  read -r pmod count height width <<<"$info"
  [ "$pmod" = "$MODALITY" ] || die "the payload holds $pmod images, not $MODALITY: prepare --modality $MODALITY first"

  # Scratch: /dev/shm where it is large (per-epoch checkpoints of a ViT-S with optimiser are ~0.5 GB; no disk flush).
  local base=${TMPDIR:-/tmp}
  if [ "$CPU" = 0 ] && [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2{print $4}')" -gt $((4 * 1024 * 1024)) ]; then
    base=/dev/shm
  fi
  WORK=$(mktemp -d "$base/visionfm_gpu.XXXXXX")
  [ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
  say "payload $PAYLOAD: $count $MODALITY images at ${width}x${height}; scratch $WORK; results to $OUT"

  # 1. the carried wheels, into a folder of their own on PYTHONPATH (the image's python3 is itself a venv, so a
  #    --system-site-packages venv on top of it would not see its torch)
  local site="$WORK/site"
  install_payload_wheels "$PYTHON" "$PAYLOAD/wheels" "$site"
  export PYTHONPATH="$site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PYTHON" -c 'import kornia_rs' 2>/dev/null; then
    say "kornia_rs is not installed: using the carried stub (kornia.io only; pretraining does not use it)"
    PYTHONPATH="$PYTHONPATH:$PAYLOAD/stubs"
  fi
  export PYTHONUNBUFFERED=1

  # 2. versions; the pretraining import path must load (and without mm*)
  local device=cuda
  [ "$CPU" = 0 ] || device=cpu
  say "environment (install took $((SECONDS - start)) s):"
  "$PYTHON" "$REPO/benchmarks/gpu_corpus.py" env --device "$device" --site "$site" --json "$WORK/versions.json"
  if command -v nvidia-smi >/dev/null && [ "$CPU" = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || true
  fi

  # 3. the two commands' shared arguments
  local script=pretrain/dino.py load images=$count probe_steps=4 descr
  [ "$OBJECTIVE" = mae ] && script=pretrain/mae.py
  local args=(--modality "$MODALITY" --data "$PAYLOAD/images.csv" --device "$device")
  [ "$OBJECTIVE" = mae ] || args+=(--objective "$OBJECTIVE")
  if [ "$CPU" = 1 ]; then
    ARCH=vit_tiny BATCH=${BATCH:-4} WORKERS=${WORKERS:-0} probe_steps=2
    [ "$images" -gt 16 ] && images=16
    if [ "$MODALITY" = oct ]; then load="[40,100]"; else load=40; fi
    args+=(--img-size 32 --set data.limit=16)
    if [ "$OBJECTIVE" = mae ]; then
      args+=(--set mae.decoder_dim=32 --set mae.decoder_depth=1 --set mae.decoder_num_heads=4)
    else
      args+=(--local-size 16 --local-crops 2 --out-dim 64 --set head.hidden_dim=64 --set head.bottleneck_dim=32)
    fi
  else
    if [ -z "$BATCH" ]; then
      # 256 (MAE 512), halved while an epoch would have fewer than 6 steps (oct: 836 images): every epoch ends
      # with a checkpoint, which on a small corpus costs as much as a few steps
      if [ "$OBJECTIVE" = mae ]; then BATCH=512; else BATCH=256; fi
      while [ $((images / BATCH)) -lt 6 ] && [ "$BATCH" -gt 64 ]; do BATCH=$((BATCH / 2)); done
    fi
    if [ -z "$WORKERS" ]; then
      # loader workers restart every epoch; with a start method other than fork each would be sent the whole cache
      WORKERS=$("$PYTHON" -c 'import json,sys; print(4 if json.load(open(sys.argv[1]))["start_method"] == "fork" else 0)' \
                "$WORK/versions.json")
    fi
    if [ "$height" = "$width" ]; then load=$height; else load="[$height,$width]"; fi
    [ "$OBJECTIVE" = mae ] || args+=(--out-dim 8192)  # ~3.7k images: fewer prototypes than ImageNet's 65536
  fi
  [ "$images" -ge "$BATCH" ] || die "$images images are fewer than one batch of $BATCH"
  while [ $((probe_steps * BATCH)) -gt "$images" ] && [ "$probe_steps" -gt 1 ]; do probe_steps=$((probe_steps - 1)); done
  descr=$("$PYTHON" -c 'import json,sys; p=json.load(open(sys.argv[1])); print(json.dumps("%d images: %s (training splits only), JPEG q%d at %dx%d" % (p["count"], p["sources"], p["quality"], p["size"][1], p["size"][0])))' "$PAYLOAD/payload.json")
  [ "$CPU" = 0 ] || descr="${descr%\"} (CPU check: the first $images)\""
  args+=(--arch "$ARCH" --batch-size "$BATCH" --set "data.load_size=$load" --set "data.num_workers=$WORKERS"
         --set "export.data_description=$descr")

  # 4. probe: a few epochs of $probe_steps steps (step time, and what each epoch's checkpoint costs)
  say "probe: $script, $((3 * probe_steps)) steps of $BATCH on $((probe_steps * BATCH)) images"
  local t0=$SECONDS
  "$PYTHON" "$script" "${args[@]}" --output "$WORK/probe" --epochs 100 --max-steps $((3 * probe_steps)) \
    --set "data.limit=$((probe_steps * BATCH))" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$WORK/probe.log"
  say "probe took $((SECONDS - t0)) s"
  local plan epochs warmup
  plan=$("$PYTHON" "$REPO/benchmarks/gpu_corpus.py" plan --probe-dir "$WORK/probe" --probe-log "$WORK/probe.log" \
         --images "$images" --batch "$BATCH" --seconds "$SECONDS_BUDGET" --objective "$OBJECTIVE" --json "$WORK/plan.json")
  printf '%s\n' "$plan" | sed '$d'
  read -r epochs warmup <<<"$(printf '%s\n' "$plan" | tail -n 1)"
  rm -rf "$WORK/probe"

  # 5. the run
  local run=("$PYTHON" "$script" "${args[@]}" --output "$WORK/run" --epochs "$epochs"
             --set "optim.warmup_epochs=$warmup" --set "train.max_seconds=$SECONDS_BUDGET" --export-to "$WORK/run/export")
  [ "$CPU" = 0 ] || run+=(--max-steps 6)
  run+=(${EXTRA[@]+"${EXTRA[@]}"})
  say "run: ${run[*]}"
  t0=$SECONDS
  local rc=0
  "${run[@]}" 2>&1 | tee "$WORK/run.log" || rc=$?
  say "run took $((SECONDS - t0)) s (exit $rc)"

  # 6. results into $OUT
  "$PYTHON" "$REPO/benchmarks/gpu_corpus.py" finish --run-dir "$WORK/run" --run-log "$WORK/run.log" --out "$OUT" \
    --plan "$WORK/plan.json" --versions "$WORK/versions.json" --payload "$PAYLOAD/payload.json" \
    --command "${run[*]}" --part-mib "$PART_MIB" || { [ "$rc" != 0 ] || rc=1; }
  say "done in $((SECONDS - start)) s"
  return "$rc"
}

set -o pipefail
rm -f "$OUT/run.log"
main 2>&1 | tee "$OUT/run.log"
