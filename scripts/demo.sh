#!/usr/bin/env bash
# Demo: render the demo room into a ROS 2 bag (cached), replay it through the mapping node over ROS
# (the same node users deploy: sim time, reliable QoS), score the labelled map against the ground truth
# and write build/demo/report/report.md (+ report.json and figures). The ConSE backend is replayed offline on
# the same bag for comparison (--compare-backends conse).
# Extra arguments go to geopurify-eval, e.g. `./scripts/demo.sh --mode both` or `--max-frames 30`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ ! -f build/env.sh ]; then
  echo "build/env.sh missing: run ./scripts/setup.sh first" >&2
  exit 1
fi
# shellcheck disable=SC1091
. build/env.sh

geopurify-make-demo --size demo --seed 0 --out build/demo      # no-op when build/demo is up to date
geopurify-eval build/demo/bag_mcap --gt build/demo/ground_truth.npz --labels config/labels.yaml \
  --params config/mapping.yaml --mode ros --compare-backends conse --out build/demo/report "$@"
echo "demo report: $ROOT/build/demo/report/report.md"
