#!/usr/bin/env bash
# The Fashion-MNIST study's finished runs, kept in the repository without their checkpoints,
# so that the study (hours on 2 cores) can span machines and sessions and docs/results.md can
# be regenerated from what is committed.
#   scripts/study-runs.sh save          runs/experiments/fmnist-runs -> results/fmnist-runs
#   scripts/study-runs.sh restore       results/fmnist-runs -> runs/experiments/fmnist-runs
#   scripts/study-runs.sh save-long     runs trained past 4,000 steps -> results/fmnist-long-runs
#   scripts/study-runs.sh restore-long  results/fmnist-long-runs -> runs/experiments/fmnist-runs
# A restored run counts as finished (done.json, samples, metrics). Its checkpoints are not
# kept, so extending it to a longer budget (fmnist-long.toml) trains it again from step 0, and
# the retrained run is not bit-identical on another host: the long runs are kept apart so that
# the 4,000-step tables keep their runs. restore-long before restore on a clean runs/ folder
# gives the long grid's report (restore never overwrites a live run).
set -euo pipefail
cd "$(dirname "$0")/.."
live=runs/experiments/fmnist-runs
kept=results/fmnist-runs
kept_long=results/fmnist-long-runs
budget=4000  # the 4,000-step grids' train.steps
root=$PWD

# Copy one finished run's small files (config, metrics, logs, sample grid and spec, final
# evaluations) to $2.
keep() {
  mkdir -p "$2"
  (cd "$1" && find . -type f ! -path './checkpoints/*' ! -path './tb/*' ! -name '*.npz' \
    ! -name '.lock' -print0 | xargs -0 -I{} cp --parents {} "$root/$2/")
}

steps_of() {  # the steps a finished run was trained for (done.json)
  grep -o '"steps": *[0-9]*' "$1/done.json" | grep -o '[0-9]*$'
}

restore_from() {
  [ -d "$1" ] || return 0
  mkdir -p "$live"
  for d in "$1"/*/; do
    run=$(basename "$d")
    [ -e "$live/$run" ] || cp -r "$d" "$live/$run"  # never overwrite a live run
  done
}

case "${1:-}" in
  save)
    for d in "$live"/*/; do
      [ -f "$d/done.json" ] || continue  # unfinished runs resume from their checkpoints
      keep "$d" "$kept/$(basename "$d")"
    done
    echo "saved $(find "$kept" -name done.json | wc -l) finished run(s) to $kept"
    ;;
  save-long)
    for d in "$live"/*/; do
      [ -f "$d/done.json" ] && [ "$(steps_of "$d")" -gt "$budget" ] || continue
      keep "$d" "$kept_long/$(basename "$d")"
    done
    echo "saved $(find "$kept_long" -name done.json | wc -l) long run(s) to $kept_long"
    ;;
  restore) restore_from "$kept" ;;
  restore-long) restore_from "$kept_long" ;;
  *)
    echo "usage: $0 save|restore|save-long|restore-long" >&2
    exit 2
    ;;
esac
