# Shared by benchmarks/gpu_pretrain.sh and benchmarks/gpu_check.sh (sourced, not run).
#
# install_payload_wheels PYTHON WHEEL_DIR SITE: the carried wheels into SITE with
# `pip install --no-index --no-deps --target` (the GPU image's python3 is itself a venv, so a --system-site-packages
# venv on top of it would not see its torch); pure-Python wheels in one call, binary ones one by one (a wheel for
# another Python is skipped with a note). The caller puts SITE on PYTHONPATH.
install_payload_wheels() {
  local python=$1 wheel_dir=$2 site=$3 pure=() binary=() w
  mkdir -p "$site"
  for w in "$wheel_dir"/*.whl; do
    [ -e "$w" ] || continue
    case "$w" in *-none-any.whl) pure+=("$w") ;; *) binary+=("$w") ;; esac
  done
  local pipi=("$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile
              --no-cache-dir --upgrade --target "$site")
  if [ ${#pure[@]} -gt 0 ]; then
    printf '[gpu] installing %s\n' "${pure[*]##*/}"
    "${pipi[@]}" "${pure[@]}"
  fi
  for w in ${binary[@]+"${binary[@]}"}; do
    "${pipi[@]}" "$w" || printf '[gpu] skipped %s (not for this Python or platform)\n' "${w##*/}"
  done
}
