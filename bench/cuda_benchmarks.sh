#!/usr/bin/env bash
# The hot-path benchmarks with `device: cuda`, in one run: fusion (bench_fusion prints a cuda row when a GPU is
# visible), purification, text queries and feature extraction. Prints everything to stdout; exits 3 without a GPU.
#
#   bench/cuda_benchmarks.sh            # uses build/env.sh when present, else the python on PATH
#
# Needs what the benchmarks import: torch with CUDA, this package's Python dependencies (numpy, the ConSE model
# wheels for bench_query/bench_features) and the repository checkout; no network and no ROS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
[ -f build/env.sh ] && . build/env.sh
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
python -c 'import sys, torch; ok = torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name(0) if ok else "no CUDA device"); sys.exit(0 if ok else 3)'
python bench/bench_fusion.py --threads 1 --frames 20
python bench/bench_purify.py --device cuda --threads 1 --sizes 10000 100000 200000
python bench/bench_query.py --device cuda --threads 1 --repeats 9
python bench/bench_features.py --device cuda --threads 1 --frames 10
