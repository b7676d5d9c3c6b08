#!/usr/bin/env bash
# The GPU benchmark in one command (issue 12 item 7): correctness checks first, then the
# FedAvg-CNN round and provenance timings, then the scale study's cells that fit its budget
# (configs/scale.py:gpu); at most 8 minutes on one H100/H200. Rows go to
# benchmarks/results/gpu.jsonl (appended) and benchmarks/results/gpu.md (this run's table);
# the exit status is non-zero if a check failed. Extra arguments go to gpu.py
# (--smoke --out=DIR: the same script at CPU size). The million-client preset
# (configs/scale.py:million_gpu) is its own command, within 10 minutes:
#   bash benchmarks/gpu.sh --sections=million --time-limit=540
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# JAX preallocates 75% of GPU memory by default; leave room for the PyTorch original.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"
cd "$ROOT"
exec python benchmarks/gpu.py "$@"
