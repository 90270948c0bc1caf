#!/usr/bin/env bash
# README's command 1 as a new user meets it, timed: a fresh clone of this repository's HEAD and a fresh venv,
# `pip install -r requirements.txt`, then `python train_toy.py`. Prints {"install_s", "quickstart_s", "total_s"}.
# Usage: bash benchmarks/command1.sh [work folder, default /tmp/e2ediff-command1]   (~9 min on 2 cores)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/e2ediff-command1}"
rm -rf "$work" && git clone -q "$repo" "$work" && cd "$work"
start=$(date +%s.%N)
python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt
installed=$(date +%s.%N)
python train_toy.py > quickstart.log 2>&1
finished=$(date +%s.%N)
python -c "import sys, json; s, i, f = map(float, sys.argv[1:]); print(json.dumps({'install_s': round(i - s, 1), 'quickstart_s': round(f - i, 1), 'total_s': round(f - s, 1)}))" "$start" "$installed" "$finished"
