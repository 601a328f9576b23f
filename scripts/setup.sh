#!/usr/bin/env bash
# One-time (and idempotent) set-up of the project's virtual environment at .venv/.
#
# - Creates .venv/ with the system python3 if it does not exist; reuses it otherwise.
# - Keeps a torch that is already installed in .venv (for example a user's CUDA build);
#   otherwise installs torch 2.14.1 + torchvision 0.29.1 (the pair that imports cleanly here,
#   see ../shared/notes/dependencies.md).
# - Builds full mmcv 2.1.0 (compiled ops, needed by mmdet) from the sdist once per torch version
#   and flavour (CUDA ops with FORCE_CUDA=1 where torch sees a GPU or nvcc is present, else CPU
#   ops only) and caches the wheel under $VISIONFM_CACHE (default ~/.cache/visionfm), so a second
#   run of this script installs the cached wheel instead of compiling for 10 minutes.
# - Installs the rest of the stack and this package in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CACHE="${VISIONFM_CACHE:-$HOME/.cache/visionfm}"
MMCV_VERSION=2.1.0
log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$PY" ]; then
  log "creating virtual environment at $VENV"
  python3 -m venv "$VENV"
fi
# pip warns once per package about this machine's optional local index folders; keep the log readable.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
pip_install() { quiet "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# Build tooling first: mmcv's setup.py and mmengine's config loader need pkg_resources (setuptools<81).
pip_install --upgrade "pip>=24" "setuptools<81" wheel ninja psutil

if "$PY" -c "import torch" 2>/dev/null; then
  log "keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
  "$PY" -c "import torchvision" 2>/dev/null || {
    log "torchvision missing next to the installed torch: install the matching torchvision yourself"; exit 1; }
else
  log "installing torch 2.14.1 + torchvision 0.29.1 (from the local wheel store where available)"
  pip_install "torch==2.14.1" "torchvision==0.29.1"
fi
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')

# Everything but mmcv and this package; versions that import together without workarounds.
pip_install -r requirements.txt

# mmcv with compiled ops, built for *this* torch. Flavour: CUDA (FORCE_CUDA=1) where a CUDA torch sees a GPU, or
# where nvcc is present and CUDA ops are asked for (VISIONFM_MMCV_CUDA=1 or TORCH_CUDA_ARCH_LIST: a build host whose
# GPUs are not visible); else CPU. mmcv's setup.py builds CUDA kernels only with a visible GPU or FORCE_CUDA=1, so a
# GPU node reusing a CPU build would get CPU-only ops that mmdet's RetinaNet/FCOS then miss. nvcc alone does not
# switch a GPU-less machine to CUDA: a multi-architecture CUDA build takes hours on 2 cores and no test could use it.
# pip's own wheel cache keys by sdist only, so we keep our own cache keyed by torch version, python tag and flavour.
NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] || { [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; } || true
read -r TORCH_CUDA GPU_SEEN GPU_ARCH <<<"$("$PY" -c 'import torch; g = torch.cuda.is_available(); print(torch.version.cuda or "none", int(g), "%d.%d" % torch.cuda.get_device_capability() if g else "-")')"
FLAVOUR=cpu
if [ "$TORCH_CUDA" != none ]; then
  if [ "$GPU_SEEN" = 1 ] || { [ -n "$NVCC" ] && { [ "${VISIONFM_MMCV_CUDA:-0}" = 1 ] || [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; }; }; then
    FLAVOUR="cuda$TORCH_CUDA"
  elif [ -n "$NVCC" ]; then
    log "nvcc found but no GPU visible: mmcv with CPU ops (VISIONFM_MMCV_CUDA=1 or TORCH_CUDA_ARCH_LIST builds CUDA ops)"
  fi
fi
if "$PY" - "$MMCV_VERSION" "$FLAVOUR" "$GPU_SEEN" <<'PYCHECK' 2>/dev/null; then
import sys, mmcv
from mmcv.ops import get_compiling_cuda_version, nms  # fails when the ops are missing or built for another torch
version, flavour, gpu = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
ok = mmcv.__version__ == version
if flavour != "cpu":  # CUDA wanted: the ops must have been compiled with CUDA, and run on the GPU when there is one
    ok = ok and get_compiling_cuda_version() != "not available"
    if ok and gpu:
        import torch
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]], device="cuda")
        nms(boxes, torch.tensor([0.9, 0.8], device="cuda"), 0.5)
sys.exit(0 if ok else 1)
PYCHECK
  log "mmcv $MMCV_VERSION with ops already installed ($FLAVOUR)"
else
  PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  WHEELDIR="$CACHE/wheels/torch-$TORCH_VERSION-$PYTAG-$FLAVOUR"
  wheel=$(ls "$WHEELDIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ] && [ "$FLAVOUR" = cpu ]; then
    # caches from before the flavour was part of the key serve CPU machines (CPU ops are in every build)
    wheel=$(ls "$CACHE/wheels/torch-$TORCH_VERSION-$PYTAG"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  fi
  if [ -z "$wheel" ]; then
    log "building mmcv $MMCV_VERSION ($FLAVOUR ops) for torch $TORCH_VERSION (once; about 10 minutes on 2 cores)"
    CUDA_ENV=()
    if [ "$FLAVOUR" != cpu ]; then
      [ -n "$NVCC" ] || { log "torch sees a GPU but there is no nvcc: install the CUDA toolkit $TORCH_CUDA to build mmcv's CUDA ops"; exit 1; }
      # the visible GPU's architecture only (a fraction of the build time); without a GPU: Ampere, Hopper, Blackwell
      arch=${TORCH_CUDA_ARCH_LIST:-}
      [ -n "$arch" ] || { [ "$GPU_ARCH" != - ] && arch=$GPU_ARCH; } || arch="8.0;9.0;10.0;12.0+PTX"
      CUDA_ENV=(FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch")  # torch finds the toolkit from CUDA_HOME or nvcc
    fi
    build=$(mktemp -d)
    quiet "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation -q -d "$build" "mmcv==$MMCV_VERSION"
    tar -xzf "$build"/mmcv-"$MMCV_VERSION".tar.gz -C "$build"
    # torch >= 2.10's ATen headers require C++20; mmcv 2.1.0 asks for C++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$build/mmcv-$MMCV_VERSION/setup.py"
    mkdir -p "$WHEELDIR"
    (cd "$build/mmcv-$MMCV_VERSION" && quiet env ${CUDA_ENV[@]+"${CUDA_ENV[@]}"} MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -q -w "$build/dist" .)
    cp "$build"/dist/mmcv-*.whl "$WHEELDIR"/
    rm -rf "$build"
    wheel=$(ls "$WHEELDIR"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
  else
    log "using cached mmcv wheel $wheel"
  fi
  pip_install --no-deps --force-reinstall "$wheel"
fi

pip_install --no-deps --no-build-isolation -e .
# The 'onnx' extra of setup.cfg (ONNX export checked with onnxruntime; the tests use it), read from setup.cfg so
# the list lives in one place; the install above is --no-deps, so the extra is installed here.
if ! "$PY" -c "import onnx, onnxruntime" 2>/dev/null; then
  ONNX_EXTRA=$("$PY" -c 'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg");
print(" ".join(r.strip() for r in c["options.extras_require"]["onnx"].replace(";", "\n").splitlines() if r.strip()))')
  log "installing the onnx extra: $ONNX_EXTRA"
  pip_install $ONNX_EXTRA
fi
"$PY" -c "import visionfm, mmseg, mmdet, mmcv.ops, timm, lightly, kornia, onnx, onnxruntime" \
  && log "environment ready: $VENV (torch $TORCH_VERSION)"
