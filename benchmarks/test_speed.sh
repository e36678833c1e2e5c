#!/usr/bin/env bash
# The fast tier of this checkout against that of an earlier commit, back to back on the same machine:
#   bash benchmarks/test_speed.sh REV   (e.g. 3fec5a7; needs `make install` first)
# Runs this tree's `make test`, then REV's fast tier (its own `pytest -q`, in a temporary git worktree, with this
# venv), then this tree's again, and prints the wall time and load average of each run.
set -uo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bash benchmarks/test_speed.sh REV}
old=$(mktemp -d)
git worktree add -q --detach "$old" "$rev" || exit 2
trap 'git worktree remove --force "$old"' EXIT
run() {
  local name=$1 dir=$2; shift 2
  local start=$(date +%s) load=$(cut -d' ' -f1 /proc/loadavg)
  (cd "$dir" && "$@" > "$old.$name.log" 2>&1)
  echo "$name: exit $? in $(( $(date +%s) - start )) s (load $load before); $(grep -E 'passed|failed' "$old.$name.log" | tail -1)"
}
run "this tree" . make test
run "$rev" "$old" "$PWD/.venv/bin/python" -m pytest -q
run "this tree again" . make test
