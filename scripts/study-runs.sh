#!/usr/bin/env bash
# The Fashion-MNIST study's finished runs, kept in the repository without their checkpoints,
# so that the study (hours on 2 cores) can span machines and sessions and docs/results.md can
# be regenerated from what is committed. Each grid's runs live in a pool of their own
# ([experiment] shared_runs), kept under the same name:
#   runs/experiments/fmnist-runs       <-> results/fmnist-runs       (Tables 2-4, 4,000 steps)
#   runs/experiments/fmnist-long-runs  <-> results/fmnist-long-runs  (fmnist-long, 12,000 steps)
#   runs/experiments/fmnist-screen-runs, ...-confirm-runs, ...       (the later grids)
#
#   scripts/study-runs.sh save [POOL...]     finished live runs -> results/POOL (default: every
#                                            runs/experiments/fmnist-*runs pool)
#   scripts/study-runs.sh restore [POOL...]  results/POOL -> runs/experiments/POOL (default:
#                                            every results/fmnist-*runs pool)
#   scripts/study-runs.sh save-long | restore-long   the same for fmnist-long-runs alone
#
# Neither direction overwrites anything. restore never replaces a live run. save never
# replaces a kept run: a live run whose files match its kept copy only adds the files the copy
# lacks (a new final evaluation, say) and the lines its log.txt gained since (the kept log a
# strict prefix of the live one); one whose files differ (retrained on another host,
# extended, resumed) is refused with a message and the exit status is 1, so that no committed
# number changes behind the tables' back. save skips a run whose runner still holds its .lock
# (done.json is written before the final sampling and evaluation: saved then, the run would be
# kept without them). A restored run counts as finished (done.json,
# samples, metrics) but has no checkpoints: the runner refuses to extend it.
set -euo pipefail
cd "$(dirname "$0")/.."
live_root=runs/experiments
kept_root=results
root=$PWD

# The files of one run folder that are kept: all but checkpoints, TensorBoard events, sample
# files (.npz), the runner's lock and temporary files. NUL-separated paths relative to $1.
kept_files() {
  (cd "$1" && find . -type f ! -path './checkpoints/*' ! -path './tb/*' ! -name '*.npz' \
    ! -name '*.lock' ! -name '*.tmp' -print0)
}

# Copy one finished run's kept files to $2, never replacing a kept file. Prints "new",
# "same", "added" or "differs: FILES".
keep() {
  local src=$1 dst=$2 f differ=() missing=() grown=() fresh=0
  if [ ! -d "$dst" ]; then
    mkdir -p "$dst"
    kept_files "$src" | (cd "$src" && xargs -0 -r -I{} cp --parents {} "$root/$dst/")
    echo new
    return
  fi
  while IFS= read -r -d '' f; do
    if [ -e "$dst/$f" ]; then
      if cmp -s "$src/$f" "$dst/$f"; then
        :
      elif [ "${f##*/}" = log.txt ] && grew "$dst/$f" "$src/$f"; then
        grown+=("$f")
      else
        differ+=("${f#./}")
      fi
    else
      fresh=1
    fi
  done < <(kept_files "$src")
  while IFS= read -r -d '' f; do
    [ -e "$src/$f" ] || missing+=("${f#./} (gone)")
  done < <(kept_files "$dst")
  if [ ${#differ[@]} -gt 0 ] || [ ${#missing[@]} -gt 0 ]; then
    echo "differs: ${differ[*]} ${missing[*]}"
    return
  fi
  if [ "$fresh" = 1 ] || [ ${#grown[@]} -gt 0 ]; then
    while IFS= read -r -d '' f; do
      [ -e "$dst/$f" ] || (cd "$src" && cp --parents "$f" "$root/$dst/")
    done < <(kept_files "$src")
    for f in "${grown[@]}"; do cp "$src/$f" "$dst/$f"; done
    echo added
  else
    echo same
  fi
}

# True when file $2 is file $1 with lines appended (a log that only grew).
grew() {
  local n
  n=$(stat -c %s "$1")
  [ "$(stat -c %s "$2")" -gt "$n" ] && cmp -s -n "$n" "$1" "$2"
}

# True when a runner holds the run's .lock (still training, sampling or evaluating it).
busy() {
  [ -e "$1/.lock" ] && ! flock -n "$1/.lock" true
}

save_pool() {  # $1: pool name
  local live=$live_root/$1 kept=$kept_root/$1 d run what n_new=0 n_same=0 n_added=0 n_bad=0
  local n_busy=0
  [ -d "$live" ] || return 0
  for d in "$live"/*/; do
    [ -f "$d/done.json" ] || continue  # unfinished runs resume from their checkpoints
    if busy "$d"; then
      n_busy=$((n_busy + 1))
      continue
    fi
    run=$(basename "$d")
    what=$(keep "$d" "$kept/$run")
    case "$what" in
      new) n_new=$((n_new + 1)) ;;
      same) n_same=$((n_same + 1)) ;;
      added) n_added=$((n_added + 1)) ;;
      *)
        n_bad=$((n_bad + 1))
        echo "NOT saved: $d differs from its kept copy $kept/$run (${what#differs: });" \
          "a kept run is never overwritten: keep the new run in another pool, or remove the" \
          "kept copy by hand (git rm) if it is meant to go" >&2
        ;;
    esac
  done
  echo "$1: $n_new new, $n_added with new files, $n_same unchanged, $n_bad refused," \
    "$n_busy busy (its runner still at work: save again when it is done);" \
    "$(find "$kept" -name done.json 2>/dev/null | wc -l) finished run(s) kept in $kept"
  [ "$n_bad" = 0 ]
}

restore_pool() {  # $1: pool name
  local kept=$kept_root/$1 live=$live_root/$1 d run n=0
  [ -d "$kept" ] || return 0
  mkdir -p "$live"
  for d in "$kept"/*/; do
    run=$(basename "$d")
    if [ ! -e "$live/$run" ]; then  # never overwrite a live run
      cp -r "$d" "$live/$run"
      n=$((n + 1))
    fi
  done
  echo "$1: restored $n run(s) to $live"
}

pools_in() {  # the fmnist-*runs pools under $1
  local p
  for p in "$1"/fmnist-*runs; do [ -d "$p" ] && basename "$p"; done
  return 0
}

cmd=${1:-}
shift || true
case "$cmd" in
  save | restore)
    if [ $# -gt 0 ]; then pools=("$@"); else
      mapfile -t pools < <(pools_in "$([ "$cmd" = save ] && echo "$live_root" || echo "$kept_root")")
    fi
    status=0
    for p in "${pools[@]}"; do
      "${cmd}_pool" "$p" || status=1
    done
    exit $status
    ;;
  save-long) save_pool fmnist-long-runs ;;
  restore-long) restore_pool fmnist-long-runs ;;
  *)
    echo "usage: $0 save|restore [POOL...] | save-long | restore-long" >&2
    exit 2
    ;;
esac
