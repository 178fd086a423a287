#!/usr/bin/env bash
# One prepared GPU check (issue 17): bash benchmarks/gpu_check.sh OUT [--dry-run] [--budget S] [--skip ...] [--bundle F]
# Runs pytest -m gpu and every GPU benchmark table in <= 8 minutes on one H100/H200; writes markdown + JSON to OUT.
# --dry-run: the same code on CPU with tiny shapes. Options: python benchmarks/gpu_check.py --help.
# Python: $PYTHON, else the repo's .venv, else python3. If ssl3d's commands are not installed next to that Python
# (a bare GPU machine), wheels in .whl/ are installed first (offline) and then ssl3d itself (editable, no deps).
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT [--dry-run] [--budget SECONDS] [--skip SECTION ...]" >&2
    exit 2
fi
py="${PYTHON:-}"
[ -z "$py" ] && [ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
[ -z "$py" ] && py="$(command -v python3)"
bin="$(dirname "$py")"
if [ ! -x "$bin/ssl_pretrain" ]; then
    mkdir -p "$1" || exit 2
    {
        echo "ssl3d commands not found beside $py: installing (offline)"
        if [ -d "$root/.whl" ]; then
            "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$root"/.whl/*.whl
        fi
        "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e "$root"
    } >"$1/setup.log" 2>&1 || { echo "gpu_check: installing ssl3d failed; see $1/setup.log" >&2; tail -5 "$1/setup.log" >&2; exit 2; }
fi
export PYTHONUNBUFFERED=1
exec "$py" "$root/benchmarks/gpu_check.py" "$@"
