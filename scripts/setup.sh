#!/usr/bin/env bash
# One-time (and idempotent) set-up of the project's virtual environment at .venv/.
#
# - Creates .venv/ with the system python3 if it does not exist; reuses it otherwise.
# - Keeps a torch that is already installed in .venv (for example a user's CUDA build);
#   otherwise installs torch 2.14.1 + torchvision 0.29.1 (the pair that imports cleanly here,
#   see ../shared/notes/dependencies.md).
# - Builds full mmcv 2.1.0 (compiled ops, needed by mmdet) from the sdist once per torch version
#   and caches the wheel under $VISIONFM_CACHE (default ~/.cache/visionfm), so a second run of
#   this script installs the cached wheel instead of compiling for 10 minutes.
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

# mmcv with compiled ops, built for *this* torch. pip's own wheel cache keys by sdist only, so we keep
# our own cache keyed by the torch version and the python tag.
if "$PY" - "$MMCV_VERSION" <<'PYCHECK' 2>/dev/null; then
import sys, mmcv
from mmcv.ops import nms  # noqa: F401  (fails when the compiled ops are missing or built for another torch)
sys.exit(0 if mmcv.__version__ == sys.argv[1] else 1)
PYCHECK
  log "mmcv $MMCV_VERSION with ops already installed"
else
  PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  WHEELDIR="$CACHE/wheels/torch-$TORCH_VERSION-$PYTAG"
  wheel=$(ls "$WHEELDIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    log "building mmcv $MMCV_VERSION for torch $TORCH_VERSION (once; about 10 minutes on 2 cores)"
    build=$(mktemp -d)
    quiet "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation -q -d "$build" "mmcv==$MMCV_VERSION"
    tar -xzf "$build"/mmcv-"$MMCV_VERSION".tar.gz -C "$build"
    # torch >= 2.10's ATen headers require C++20; mmcv 2.1.0 asks for C++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$build/mmcv-$MMCV_VERSION/setup.py"
    mkdir -p "$WHEELDIR"
    (cd "$build/mmcv-$MMCV_VERSION" && quiet env MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
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
"$PY" -c "import visionfm, mmseg, mmdet, mmcv.ops, timm, lightly, kornia" \
  && log "environment ready: $VENV (torch $TORCH_VERSION)"
