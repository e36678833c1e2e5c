#!/usr/bin/env bash
# Parity ablation (issue 4): short MTU runs that each vary one thing the paper suggests when a task falls short --
# task sampling weights, experts per FFN (N) -- and one seed replicate, next to the four full fine-tune baselines
# at the same step count and the shipped 2,000-step models; all scored on held-out scenes 1000-1099 (not the ones
# the shipped parity table reports). `make ablation` runs it; re-running skips finished runs; collect with
# `python benchmarks/collect_runs.py`.
set -euo pipefail
BIN=${BIN:-.venv/bin}
BASE=${BASE:-models/shapes-base}
RUNS=${RUNS:-runs/ablation}
STEPS=${STEPS:-500}
COUNT=${COUNT:-100}
CACHES=${CACHES:-runs/mtu/work/mtu}   # VAE-encoded train caches to reuse (built on first use if absent)

score() {  # score DIR MODEL TASKS: the held-out scenes 1000.. of this ablation, written to DIR/eval.json
  "$BIN/mtu-export" eval "$2" --task "$3" --split heldout --first 1000 --count "$COUNT" --guidance 3 \
    --json "$1/eval.json.tmp"
  mv "$1/eval.json.tmp" "$1/eval.json"
}

run() {  # run NAME TASKS -- train options...
  local name=$1 tasks=$2; shift 2
  local dir=$RUNS/$name
  if [[ -f $dir/eval.json ]]; then echo "== $name: done"; return; fi
  mkdir -p "$dir/work"
  for t in t2i edit sr inpaint; do
    [[ -d $CACHES/cache-$t && ! -d $dir/work/cache-$t ]] && cp -rl "$CACHES/cache-$t" "$dir/work/" 2>/dev/null || true
  done
  echo "== $name: train $*"
  "$BIN/mtu-export" train "$BASE" --work "$dir/work" --out "$dir/out" --steps "$STEPS" --resume --overwrite "$@"
  echo "== $name: eval"
  score "$dir" "$dir/out" "$tasks"
}

OPTIM="--batch-size 64 --lr 1e-3 --input-lr-scale 10 --min-snr-gamma 0"
MTU="$OPTIM --seed 0"
SINGLE="--batch-size 16 --lr 3e-4 --input-lr-scale 30 --min-snr-gamma 0 --seed 0"
run mtu-default all $MTU
run mtu-weights-1322 all $MTU --task-weights t2i=1,edit=3,sr=2,inpaint=2
for t in t2i edit sr inpaint; do run single-$t "$t" --single-task "$t" $SINGLE; done
run mtu-n8 all $MTU --experts 8
run mtu-n2 all $MTU --experts 2
run mtu-default-seed1 all $OPTIM --seed 1   # the same run on another seed: how far apart runs land by chance

# The shipped 2,000-step models on the same scenes: the gap at 500 vs 2,000 steps (the "more steps" trend).
shipped() {  # shipped NAME MODEL TASKS WORK (WORK = the run's work folder, for its train_config.json and log)
  local name=$1 model=$2 tasks=$3 work=$4 dir=$RUNS/$1
  if [[ -f $dir/eval.json ]]; then echo "== $name: done"; return; fi
  if [[ ! -f $work/train_config.json ]]; then
    echo "== $name: skipped, $work holds no train_config.json (train the shipped models with make mtu-models first)"
    return
  fi
  mkdir -p "$dir" && cp "$work/train_config.json" "$work/train-log.jsonl" "$dir/"
  echo "== $name: eval"
  score "$dir" "$model" "$tasks"
}
SHIPPED_RUNS=${SHIPPED_RUNS:-runs/mtu}   # where `make mtu-models` trained the shipped models
shipped shipped-mtu models/shapes-mtu all "$SHIPPED_RUNS/work/mtu"
for t in t2i edit sr inpaint; do shipped "shipped-single-$t" "models/shapes-single-$t" "$t" "$SHIPPED_RUNS/work/single-$t"; done
