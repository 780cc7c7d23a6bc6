# Shared set-up for scripts/serve and scripts/test: a project-local .venv with the engine
# installed in editable mode and its Cython extensions built in place.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"

quiet_pip() {
    # The machine's pip may list local mirrors that do not exist; their warnings are noise.
    local rc
    set +e
    "$VENV/bin/python" -m pip -q "$@" 2>&1 | { grep -v "^WARNING: Location" >&2; true; }
    rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    quiet_pip install --upgrade pip
fi

# Reinstall when the dependency list changes; otherwise just rebuild changed extensions.
extras="${1:-}"
stamp_prefix="$VENV/.installed-${extras:-base}-"
stamp="$stamp_prefix$(cat pyproject.toml setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing the engine${extras:+ with [$extras]}" >&2
    quiet_pip install "setuptools>=77" wheel "Cython>=3.0,<4"
    quiet_pip install -e ".${extras:+[$extras]}"
    rm -f "$stamp_prefix"*
    touch "$stamp"
fi
"$VENV/bin/python" setup.py -q build_ext --inplace >/dev/null
export PATH="$VENV/bin:$PATH"
