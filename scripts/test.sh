#!/usr/bin/env bash
# Set up (or reuse) the environment, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
# Two pytest-xdist workers, each with one of two cores (tests/conftest.py): the stage processes the slow tests
# launch compute on one thread each, so one worker alone leaves a core idle. Work goes out file by file, and
# the files that share a trained session fixture (the demo's stages 1-2, the real model) as one unit, so each
# fixture is made once (tests/conftest.py, pytest_xdist_make_scheduler). TEST_WORKERS=0 runs everything in
# this process, one test after another.
workers="${TEST_WORKERS:-$(( $(nproc) >= 2 ? 2 : 0 ))}"
exec python -m pytest -n "$workers" --dist loadfile "$@"
