#!/usr/bin/env bash
# The scheduled check: the test suite against the newest releases of every dependency, in a separate
# environment (.venv-latest), so that an upstream release that breaks us is seen before users see it.
#     bash scripts/check_latest.sh [pytest args]      (weekly, e.g. cron: 0 3 * * 1 cd REPO && bash scripts/check_latest.sh)
# Prints the versions that differ from constraints.txt, then runs the suite. When it passes, adopt the
# new versions with `VENV=.venv-latest bash scripts/lock.sh` and commit constraints.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VENV="${VENV:-$ROOT/.venv-latest}" CONSTRAINTS=none
rm -rf "$VENV"  # a new environment each time: every dependency resolves to its newest release
source "$ROOT/scripts/setup.sh"
echo "[latest] versions that differ from constraints.txt:"
"$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
    | grep -v '^#' | sort -f | comm -13 <(grep -v '^#' "$ROOT/constraints.txt" | sort -f) - || true
cd "$ROOT"
exec python -m pytest "$@"
