#!/usr/bin/env bash
# Parity ablation (issue 4): short MTU runs that vary one thing each -- task sampling weights, experts per FFN (N),
# conv_in learning-rate multiplier -- plus the four full fine-tune baselines at the same step count, all evaluated
# on held-out scenes 1000.. (not the ones the shipped parity table reports). `make ablation` runs it; re-running
# skips finished runs. Collect with `python benchmarks/collect_runs.py`.
set -euo pipefail
BIN=${BIN:-.venv/bin}
BASE=${BASE:-models/shapes-base}
RUNS=${RUNS:-runs/ablation}
STEPS=${STEPS:-500}
COUNT=${COUNT:-100}
CACHES=${CACHES:-runs/mtu/work/mtu}   # VAE-encoded train caches to reuse (built on first use if absent)

run() {  # run NAME TASKS -- train options...
  local name=$1 tasks=$2; shift 2
  local dir=$RUNS/$name
  if [[ -f $dir/eval.json ]]; then echo "== $name: done"; return; fi
  mkdir -p "$dir/work"
  for t in t2i edit sr inpaint; do
    [[ -f $CACHES/cache-$t.safetensors ]] && ln -f "$CACHES/cache-$t.safetensors" "$dir/work/" 2>/dev/null || true
  done
  echo "== $name: train $*"
  "$BIN/mtu-export" train "$BASE" --work "$dir/work" --out "$dir/out" --steps "$STEPS" --seed 0 --resume --overwrite "$@"
  echo "== $name: eval"
  "$BIN/mtu-export" eval "$dir/out" --task "$tasks" --split heldout --first 1000 --count "$COUNT" --guidance 3 \
    --json "$dir/eval.json.tmp"
  mv "$dir/eval.json.tmp" "$dir/eval.json"
}

MTU="--batch-size 64 --lr 1e-3 --input-lr-scale 10"
SINGLE="--batch-size 16 --lr 3e-4 --input-lr-scale 30"
run mtu-default all $MTU
run mtu-weights-1322 all $MTU --task-weights t2i=1,edit=3,sr=2,inpaint=2
for t in t2i edit sr inpaint; do run single-$t "$t" --single-task "$t" $SINGLE; done
run mtu-n8 all $MTU --experts 8
run mtu-n2 all $MTU --experts 2
run mtu-inputx30 all --batch-size 64 --lr 1e-3 --input-lr-scale 30
