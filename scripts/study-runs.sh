#!/usr/bin/env bash
# The Fashion-MNIST study's finished runs, kept in the repository without their checkpoints,
# so that the study (hours on 2 cores) can span machines and sessions and docs/results.md can
# be regenerated from what is committed.
#   scripts/study-runs.sh save      runs/experiments/fmnist-runs -> results/fmnist-runs
#   scripts/study-runs.sh restore   results/fmnist-runs -> runs/experiments/fmnist-runs
# A restored run counts as finished (done.json, samples, metrics). Its checkpoints are not
# kept, so extending it to a longer budget (fmnist-long.toml) trains it again from step 0.
set -euo pipefail
cd "$(dirname "$0")/.."
live=runs/experiments/fmnist-runs
kept=results/fmnist-runs
root=$PWD
case "${1:-}" in
  save)
    mkdir -p "$kept"
    for d in "$live"/*/; do
      run=$(basename "$d")
      [ -f "$d/done.json" ] || continue  # unfinished runs resume from their checkpoints
      mkdir -p "$kept/$run"
      # Small files only: config, metrics, logs, sample grid and spec, final evaluations.
      (cd "$d" && find . -type f ! -path './checkpoints/*' ! -path './tb/*' ! -name '*.npz' \
        ! -name '.lock' -print0 | xargs -0 -I{} cp --parents {} "$root/$kept/$run/")
    done
    echo "saved $(find "$kept" -name done.json | wc -l) finished run(s) to $kept"
    ;;
  restore)
    [ -d "$kept" ] || exit 0
    mkdir -p "$live"
    for d in "$kept"/*/; do
      run=$(basename "$d")
      [ -e "$live/$run" ] || cp -r "$d" "$live/$run"  # never overwrite a live run
    done
    ;;
  *)
    echo "usage: $0 save|restore" >&2
    exit 2
    ;;
esac
