#!/usr/bin/env bash
# One command on a machine with one NVIDIA GPU (issue 15 item 7): parity of JAX and PyTorch on the
# GPU (TF32 off), then the thesis training step of every variant at 128 px batch 24 and 256 px
# batch 8 (images/s, compile time, peak device memory, MFU), written to one JSON.
# Budget: setting up Python <= ~3 min, the checks <= DEVICE_CHECK_BUDGET_S (270 s), < 8 min in all.
# Usage: bash scripts/device_check.sh [OUT.json]   (default docs/benchmarks/gpu_device_check.json)
# Python: $PYTHON, else python3 when it already has CUDA builds of jax and torch (a GPU image),
# else a fresh venv in /tmp with jax[cuda13] (or jax[cuda12]) and torch from PyPI. Pure-Python
# packages the image lacks (ml-collections, ...) install from ./.whl/*.whl when that folder was
# carried along (no network; make it with `pip download --no-deps -d .whl ml-collections`),
# else from PyPI. Runs from the repo without installing it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/docs/benchmarks/gpu_device_check.json}"
BUDGET="${DEVICE_CHECK_BUDGET_S:-270}"
VENV=/tmp/dermseg_device_venv
SITE=/tmp/dermseg_device_site
log() { echo "[device_check $(date +%T)] $*" >&2; }

gpu_stack() {  # does python $1 have jax on a GPU and torch with CUDA?
  timeout 180 "$1" -c 'import jax, torch; assert jax.default_backend() == "gpu"
assert torch.cuda.is_available()' >/dev/null 2>&1
}

PY="${PYTHON:-python3}"
if ! gpu_stack "$PY"; then
  log "$PY lacks CUDA jax/torch: installing them into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  for extra in cuda13 cuda12; do
    if timeout 300 "$VENV/bin/pip" install -q --retries 1 --timeout 20 \
      "jax[$extra]>=0.10,<0.13" torch torchvision; then
      break
    fi
  done
  PY="$VENV/bin/python"
  gpu_stack "$PY" || { log "no CUDA jax/torch after installing: see pip's output"; exit 2; }
fi

# The project's pure-Python needs (no TensorFlow: the checks never import it).
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"flax": "flax>=0.12,<0.13", "optax": "optax>=0.2.5", "chex": "chex",
        "orbax.checkpoint": "orbax-checkpoint>=0.12,<0.13", "ml_collections": "ml-collections",
        "absl": "absl-py", "tqdm": "tqdm", "torchvision": "torchvision"}
print(" ".join(spec for module, spec in need.items() if importlib.util.find_spec(module) is None))
PYEOF
)
if [ -n "$missing" ]; then
  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    log "installing carried wheels from .whl into $SITE (missing: $missing)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$ROOT"/.whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    log "installing $missing"
    # shellcheck disable=SC2086  # one argument per requirement
    timeout 240 "$PY" -m pip install -q --retries 1 --timeout 20 $missing || {
      log "could not install $missing: carry their wheels in .whl (see this script's header)"
      exit 2
    }
  fi
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Both frameworks share the GPU: JAX allocates as it goes instead of taking 75 % up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
log "python: $PY; checks budget ${BUDGET}s; writing $OUT"
cd "$ROOT"
exec timeout $((BUDGET + 180)) "$PY" scripts/device_check.py --device gpu --budget-s "$BUDGET" \
  --out "$OUT"
