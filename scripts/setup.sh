#!/usr/bin/env bash
# Set up everything cmpnas needs on a fresh machine: a virtualenv with torch (from the local wheel
# cache when present), the package with its test extras, Debian's Fashion-MNIST package, and (with npm) ONNX
# Runtime Web for the web page's in-browser embedding.
# Usage: scripts/setup.sh [--browser]   (--browser also installs Debian's chromium for the web test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
want_browser=0
[[ "${1:-}" == "--browser" ]] && want_browser=1

log() { echo "[setup] $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch and torchvision as pinned in constraints.txt (first, so nothing else pulls another build)"
  "${PIP[@]}" install -c constraints.txt torch torchvision
fi
if ! "$VENV/bin/python" -c "import cmpnas, pytest, faiss, onnxruntime, timm" 2>/dev/null \
   || [[ pyproject.toml -nt "$VENV/.cmpnas-installed" || constraints.txt -nt "$VENV/.cmpnas-installed" ]]; then
  log "installing cmpnas with test extras"
  "${PIP[@]}" install -c constraints.txt -e '.[test]'
  touch "$VENV/.cmpnas-installed"
fi

apt_install() {
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "apt-get install $*"
    (apt-get update -qq || true) >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    return 0
  fi
  return 1
}

if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz && -z "${CMPNAS_DATA:-}" ]]; then
  if ! apt_install dataset-fashion-mnist; then
    log "WARNING: cannot install Debian's dataset-fashion-mnist (not root or no apt-get)."
    log "  Fix: 'sudo apt-get install dataset-fashion-mnist', or put the four Fashion-MNIST .gz files in a"
    log "  folder and 'export CMPNAS_DATA=/that/folder'. With internet access cmpnas downloads them itself."
  fi
fi
# The web page embeds queries in the browser with ONNX Runtime Web, pinned in web/package-lock.json and served
# by `cmpnas serve` (its WebAssembly build only, pre-compressed here). Without npm the page uploads images.
ORT_DIST=web/node_modules/onnxruntime-web/dist
ORT_FILES=(ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm)
if command -v npm >/dev/null; then
  if [[ ! -f "$ORT_DIST/ort.wasm.min.mjs" || web/package-lock.json -nt web/node_modules/.package-lock.json ]]; then
    log "installing ONNX Runtime Web for in-browser embedding (npm ci in web/)"
    (cd web && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) \
      || log "WARNING: npm ci failed (offline?); the web page will upload images instead of embedding them"
  fi
  if command -v gzip >/dev/null; then
    for f in "${ORT_FILES[@]}"; do
      if [[ -f "$ORT_DIST/$f" && ( ! -f "$ORT_DIST/$f.gz" || "$ORT_DIST/$f.gz" -ot "$ORT_DIST/$f" ) ]]; then
        gzip -kf -6 "$ORT_DIST/$f"
      fi
    done
  fi
else
  log "WARNING: npm not found: the web page will upload images instead of embedding them in the browser."
  log "  Fix: install node and npm (e.g. 'sudo apt-get install npm'), then run scripts/setup.sh again"
fi
if [[ $want_browser -eq 1 && ! -x /usr/bin/chromium ]]; then
  apt_install chromium chromium-driver || log "WARNING: chromium not installed; the browser test will be skipped"
fi
log "ready: $VENV/bin/cmpnas"
