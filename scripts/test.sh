#!/usr/bin/env bash
# Runs the whole test suite inside the environment written by scripts/setup.sh.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k voxel`).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[ -f build/env.sh ] || { echo "run scripts/setup.sh first" >&2; exit 2; }
# shellcheck disable=SC1091
. build/env.sh
python -m pytest -q -p no:cacheprovider test "$@"
