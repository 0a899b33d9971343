# Sourced by demo.sh and test.sh: creates .venv if absent and installs the project into it.
# Usage: source scripts/_venv.sh EXTRAS   (EXTRAS e.g. "" or "torch,test")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "[dermseg_jax] creating $ROOT/.venv" >&2
  "$PY" -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip
fi
spec="$ROOT"
if [ -n "${1:-}" ]; then spec="$ROOT[$1]"; fi
echo "[dermseg_jax] installing ${spec#"$ROOT"} into .venv" >&2
# The build backend's warnings go to a log, shown only if the install fails.
if ! "$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec" \
  >"$ROOT/.venv/install.log" 2>&1; then
  cat "$ROOT/.venv/install.log" >&2
  exit 1
fi
export PATH="$ROOT/.venv/bin:$PATH"
cd "$ROOT"
