PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-macos lint coreml-resources demo base-model eval-base mtu-models mtu-top1 mtu-top2 sparse-eval convergence levers curve-anchor curves ship-models parity ablation bench bench-full bench-runtime bench-exports install-runtime bench-check bench-train bench-sd15 bench-phone bench-ondevice bench-w8a16 bench-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: on this machine a local CPU wheel; an unpinned torch would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The on-device runtime alone (onnxruntime, numpy, Pillow, tokenizers; no torch, transformers or diffusers), for a
# phone-class machine that runs exported folders: `python -m mtu_export.ondevice` and `make bench`'s runtime rows.
RUNTIME_STAMP := $(VENV)/.runtime
$(RUNTIME_STAMP): requirements-ondevice.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-ondevice.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(RUNTIME_STAMP)

install-runtime: $(RUNTIME_STAMP)

# The fast tier in TEST_WORKERS processes (pytest-xdist; torch on one thread in each, see tests/conftest.py).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Core ML packages run and compared with torch (PSNR per package): macOS only; elsewhere the tests skip and say why.
test-macos: $(STAMP)
	$(BIN)/python -m pytest -q -m macos

lint: $(STAMP)
	$(BIN)/ruff check mtu_export tests
	$(BIN)/ruff format --check mtu_export tests

# Compile every .mlpackage under COREML_DIR (the --out of `mtu-export coreml --layout apple`) to the .mlmodelc beside
# it, which is what Apple's Swift StableDiffusion package loads from each <task>/Resources folder. Xcode's
# coremlcompiler exists on macOS only; elsewhere this says so and fails.
COREML_DIR ?= out/coreml-apple
coreml-resources:
	@if [ "$$(uname -s)" != Darwin ]; then \
	  echo "coreml-resources compiles with Xcode's coremlcompiler (xcrun), which needs macOS; this is $$(uname -s)"; exit 1; fi
	@test -d "$(COREML_DIR)" || { echo "no folder $(COREML_DIR): set COREML_DIR to an export of mtu-export coreml --layout apple"; exit 1; }
	find "$(COREML_DIR)" -name '*.mlpackage' -prune -print | while IFS= read -r pkg; do \
	  xcrun coremlcompiler compile "$$pkg" "$$(dirname "$$pkg")" || exit 1; done

DEMO := out/demo
TASKS := t2i edit sr inpaint

MODEL := models/shapes-base

SHIPPED := models/shapes-mtu
SPARSE := models/shapes-mtu-top2
BASELINES := $(foreach t,$(TASKS),--baseline $(t)=models/shapes-single-$(t))
RESULTS := benchmarks/results

# The main job, end to end on the shipped models: export the 4-task MTU model to ONNX (one bundle, every graph
# validated against torch), generate one image per task on onnxruntime, then bench the folded tasks against the
# single-task baselines (quick settings) and print where the report is.
demo: $(STAMP)
	$(BIN)/mtu-export onnx $(SHIPPED) --task all --out $(DEMO)/onnx --overwrite
	$(BIN)/python -m mtu_export.shapes.world_grid $(DEMO)/inputs
	for t in $(TASKS); do $(BIN)/mtu-export generate $(DEMO)/onnx --task $$t --prompt "$$(cat $(DEMO)/inputs/$$t.txt)" \
	  --image $(DEMO)/inputs/$$t.png --mask $(DEMO)/inputs/mask.png --out $(DEMO)/generated/$$t.png --overwrite || exit 1; done
	$(BIN)/mtu-export bench $(SHIPPED) $(BASELINES) --out $(DEMO)/bench --repeats 5 --modes dynamic-int8 --image-count 1 --overwrite
	@echo "exported bundle: $(DEMO)/onnx   images: $(DEMO)/generated/   report: $(DEMO)/bench/bench.md"

EVAL := $(MODEL)/eval
GUIDANCE ?= 3

# Train the shipped base model from its recipe (VAE, then text encoder + UNet); resumes from runs/shapes-base if an
# earlier run was interrupted (delete that folder to start afresh). The shipped run took 101 min on 2 shared CPU cores
# ($(MODEL)/training.json; its model card estimates 88 min unloaded). The new weights replace those in $(MODEL); its
# model card (README.md) and eval/ stay.
base-model: $(STAMP)
	$(BIN)/mtu-export pretrain --recipe models/shapes-base.toml --work runs/shapes-base --out runs/shapes-base/pipeline --overwrite
	mkdir -p $(MODEL) && cp -r runs/shapes-base/pipeline/. $(MODEL)/

# Measure it: VAE PSNR and text-to-image scene-reader accuracy on the held-out split and on unseen combinations.
eval-base: $(STAMP)
	$(BIN)/mtu-export eval $(MODEL) --split heldout --guidance $(GUIDANCE) --json $(EVAL)/heldout.json --grid $(EVAL)/heldout.png --overwrite
	$(BIN)/mtu-export eval $(MODEL) --split unseen --guidance $(GUIDANCE) --json $(EVAL)/unseen.json --grid $(EVAL)/unseen.png --overwrite

# The 4-task MTU model (N=4) and the four single-task baselines, from the shipped base model, same steps and the same
# rows per task (MTU: 16 rows of each task per step; a baseline: 16 rows of its task). Each side uses its best
# learning rates from the same sweep (sr, 500 steps; see models/shapes-mtu/README.md): MTU's small trainable set
# wants a larger lr, both want conv_in (whose condition channels start at zero) to learn faster than the rest.
# Both sides use the base's loss: v-prediction weighted alike at every timestep (--min-snr-gamma 0), as the base was
# trained. Each run resumes in its work folder if interrupted; the baselines reuse the MTU run's VAE caches. The shipped
# runs took 101 min on 2 cores (43 min MTU, 13-15 min per baseline; models/shapes-mtu/README.md).
RUNS ?= runs/mtu
TRAIN_STEPS ?= 2000
MTU_OPTIM ?= --lr 1e-3 --input-lr-scale 10
SINGLE_OPTIM ?= --lr 3e-4 --input-lr-scale 30
TRAIN_COMMON := --steps $(TRAIN_STEPS) --min-snr-gamma 0 --seed 0 --resume --overwrite

mtu-models: $(STAMP)
	$(BIN)/mtu-export train $(MODEL) --work $(RUNS)/work/mtu --out $(RUNS)/shapes-mtu --batch-size 64 \
	  $(MTU_OPTIM) $(TRAIN_COMMON)
	for t in $(TASKS); do \
	  mkdir -p $(RUNS)/work/single-$$t && { [ -d $(RUNS)/work/single-$$t/cache-$$t ] || cp -rl $(RUNS)/work/mtu/cache-$$t $(RUNS)/work/single-$$t/ ; } ; \
	  $(BIN)/mtu-export train $(MODEL) --single-task $$t --work $(RUNS)/work/single-$$t --out $(RUNS)/single-$$t \
	    --batch-size 16 $(SINGLE_OPTIM) $(TRAIN_COMMON) || exit 1; \
	done

# The shipped MTU recipe routed top-k (`mtu-top2`: each task uses its two heaviest experts per FFN, the others weigh
# exactly 0; `mtu-top1`: one expert), same data, steps, optimiser and seed: its sparse folds drop (N-k)/N of every FFN
# exactly. The shipped runs took 73 min (top-2) and about an hour (top-1, stopped and resumed) on 2 cores beside
# other jobs (their model cards).
MTU_TOPK = $(BIN)/mtu-export train $(MODEL) --route top-$(1) --work $(RUNS)/work/mtu-top$(1) --out $(RUNS)/mtu-top$(1) \
  --batch-size 64 $(MTU_OPTIM) $(TRAIN_COMMON)
mtu-top1: $(STAMP)
	$(call MTU_TOPK,1)
mtu-top2: $(STAMP)
	$(call MTU_TOPK,2)

# The top-1 and top-2 models scored as `make parity` scores the dense MTU (same examples and sampler; top-2 feeds
# bench's sparse rows), and the dense MTU cut after training (--ffn-budget 0.5 renormalized or not, 0.75,
# --prune-below 0.05): the trade-off table $(RESULTS)/sparse/tradeoff.md. About 15 min per eval on 2 cores.
sparse-eval: $(STAMP)
	for k in 1 2; do $(BIN)/mtu-export eval models/shapes-mtu-top$$k --count $(PARITY_COUNT) --guidance $(GUIDANCE) \
	  --steps 25 --image-guidance 1.5 --seed 0 --json $(RESULTS)/sparse/eval/top$$k.json --overwrite || exit 1; done
	for cut in budget0.5-renorm-no budget0.5-renorm-yes budget0.75-renorm-no prune0.05-renorm-no; do \
	  opts=$$(echo $$cut | sed -e 's/^budget/--ffn-budget /' -e 's/^prune/--prune-below /' -e 's/-renorm-no//' \
	    -e 's/-renorm-yes/ --renormalize/'); \
	  $(BIN)/mtu-export eval $(SHIPPED) $$opts --count $(PARITY_COUNT) --guidance $(GUIDANCE) --steps 25 \
	  --image-guidance 1.5 --seed 0 --json $(RESULTS)/sparse/eval/mtu-$$cut.json --overwrite || exit 1; done
	$(BIN)/python benchmarks/sparse_tradeoff.py $(RESULTS)/sparse/eval/*.json --parity $(RESULTS)/parity/parity.json \
	  --out $(RESULTS)/sparse/tradeoff

# Parity at convergence: the same two recipes at 2,500 steps a side (1.25x the shipped models'), scored every 500
# steps on held-out scenes 2000-2031 of each task (not the ones `make parity` reports) into each work folder's
# curve.jsonl. A finished run's curve.jsonl and train-log.jsonl are copied to $(CONV_RESULTS)/<run>/, which is
# committed: a run found there is done and not trained again, so the runs can be spread over sessions on different
# machines (the MTU side takes about 1.8 h on a 2-core AVX2 machine, the four baselines together about as long; an
# unfinished run resumes from its checkpoint in $(CONV_RUNS) on the same machine). Then the curves of every run in
# $(CONV_RESULTS) side by side in $(RESULTS)/curves. The baselines reuse the MTU run's VAE caches when it is here.
# CONV_PRECISION=bf16 (autocast) is about 15 % faster on a CPU with bf16 instructions and many times slower without.
CONV_RUNS ?= runs/conv
CONV_STEPS ?= 2500
CONV_PRECISION ?= no
CONV_RESULTS := $(RESULTS)/convergence
CONV_SIDES ?= mtu $(foreach t,$(TASKS),single-$(t))
CONV_COMMON := --steps $(CONV_STEPS) --min-snr-gamma 0 --seed 0 --mixed-precision $(CONV_PRECISION) \
  --eval-every 500 --resume --overwrite
convergence: $(STAMP)
	for side in $(CONV_SIDES); do \
	  if [ -f $(CONV_RESULTS)/$$side/curve.jsonl ]; then echo "$$side: done, in $(CONV_RESULTS)/$$side"; continue; fi; \
	  work=$(CONV_RUNS)/work/$$side; \
	  if [ $$side = mtu ]; then out=shapes-mtu; opts="--batch-size 64 $(MTU_OPTIM)"; \
	  else t=$${side#single-}; out=$$side; opts="--single-task $$t --batch-size 16 $(SINGLE_OPTIM)"; mkdir -p $$work; \
	    [ -d $$work/cache-$$t ] || [ ! -d $(CONV_RUNS)/work/mtu/cache-$$t ] || cp -rl $(CONV_RUNS)/work/mtu/cache-$$t $$work/; fi; \
	  $(BIN)/mtu-export train $(MODEL) $$opts --work $$work --out $(CONV_RUNS)/$$out $(CONV_COMMON) || exit 1; \
	  mkdir -p $(CONV_RESULTS)/$$side && cp $$work/curve.jsonl $$work/train-log.jsonl $(CONV_RESULTS)/$$side/ || exit 1; \
	done
	$(MAKE) curves

# The paper's levers on MTU (issue: plateau lower or later), each on the convergence schedule but stopped at
# LEVER_STEPS, so that its curve points compare one for one with the MTU curve's: sr's sampling share raised from
# 1/4 to 2/5, and the two lr ratios of experts vs conv_in (MTU_OPTIM: experts 1e-3, conv_in 1e-2): conv_in 3x
# faster, experts 2x faster with conv_in kept. `make ablation` already tried N = 2 and 8 (no change at 500 steps).
# Recorded like the convergence runs, in $(CONV_RESULTS)/lever-<name>/; `make curves` draws them too.
LEVER_STEPS ?= 1000
LEVERS ?= sr-weight conv-in-lr expert-lr
LEVER_sr-weight := --task-weights t2i=1,edit=1,sr=2,inpaint=1 $(MTU_OPTIM)
LEVER_conv-in-lr := --lr 1e-3 --input-lr-scale 30
LEVER_expert-lr := --lr 2e-3 --input-lr-scale 5
levers: $(addprefix lever-,$(LEVERS))
	$(MAKE) curves
lever-%: $(STAMP)
	@test -n "$(LEVER_$*)" || { echo "unknown lever $* (known: sr-weight conv-in-lr expert-lr)"; exit 1; }
	if [ -f $(CONV_RESULTS)/$@/curve.jsonl ]; then echo "$@: done, in $(CONV_RESULTS)/$@"; else \
	  mkdir -p $(CONV_RUNS)/work/$@ && for c in $(CONV_RUNS)/work/mtu/cache-*; do [ ! -d $$c ] || \
	    [ -d $(CONV_RUNS)/work/$@/$$(basename $$c) ] || cp -rl $$c $(CONV_RUNS)/work/$@/; done && \
	  $(BIN)/mtu-export train $(MODEL) --batch-size 64 $(LEVER_$*) --work $(CONV_RUNS)/work/$@ --out $(CONV_RUNS)/$@ \
	    $(CONV_COMMON) --stop-at $(LEVER_STEPS) && \
	  mkdir -p $(CONV_RESULTS)/$@ && cp $(CONV_RUNS)/work/$@/curve.jsonl $(CONV_RUNS)/work/$@/train-log.jsonl $(CONV_RESULTS)/$@/; fi

# The shipped (2,000-step) models scored on the curves' slice with the curves' settings: where each curve stood at
# the shipped models' length -> $(CONV_RESULTS)/shipped/<model>.json.
curve-anchor: $(STAMP)
	mkdir -p $(CONV_RESULTS)/shipped
	for m in shapes-mtu $(foreach t,$(TASKS),shapes-single-$(t)); do \
	  $(BIN)/mtu-export eval models/$$m --split heldout --first 2000 --count 32 --steps 10 --guidance 3 \
	    --image-guidance 1.5 --seed 0 --json $(CONV_RESULTS)/shipped/$$m.json --overwrite || exit 1; \
	done

# The learning curves of the runs in $(CONV_RESULTS) (mtu first), side by side per task.
curves: $(STAMP)
	$(BIN)/mtu-export curves $$(for d in $$(ls -d $(CONV_RESULTS)/mtu $(CONV_RESULTS)/single-* $(CONV_RESULTS)/lever-* 2>/dev/null); do \
	  echo "$$(basename $$d)=$$d"; done) --out $(RESULTS)/curves --overwrite

# Ship the trained runs into models/: fp16 weights, the base pipeline shared by reference; the MTU checkpoints keep
# only their trained tensors (the frozen rest is the shared base UNet's), about 67 MB in models/ in all.
# The model cards (README.md) are kept across the overwrite; update their numbers after `make parity`.
ship-models: $(STAMP)
	for m in shapes-mtu shapes-mtu-top1 shapes-mtu-top2 $(foreach t,$(TASKS),shapes-single-$(t)); do \
	  src=$$( [ $$m = shapes-mtu ] && echo $(RUNS)/shapes-mtu || echo $(RUNS)/$${m#shapes-} ); \
	  card=$$(mktemp); cp models/$$m/README.md $$card 2>/dev/null || rm -f $$card; \
	  only=$$(case $$m in shapes-mtu*) echo --trained-only;; esac); \
	  $(BIN)/mtu-export pack $$src --out models/$$m --pipeline-ref ../shapes-base $$only --overwrite || exit 1; \
	  if [ -f "$$card" ]; then mv $$card models/$$m/README.md; fi; \
	done
	du -sh models

# MTU vs the single-task baselines on the held-out split (parity.json, parity.md, a grid per task).
PARITY_COUNT ?= 200
parity: $(STAMP)
	$(BIN)/mtu-export parity $(SHIPPED) $(BASELINES) --count $(PARITY_COUNT) --guidance $(GUIDANCE) \
	  --out $(RESULTS)/parity --overwrite

# What the paper suggests when a task falls short of parity -- task sampling weights and N -- each varied alone in
# 500-step runs, with a second seed, the four baselines at 500 steps and the shipped 2,000-step models (the steps
# trend), all scored on held-out scenes 1000-1099 (not the ones `make parity` reports); about an hour on 2 cores.
# Re-running skips finished runs.
ablation: $(STAMP)
	BIN=$(BIN) BASE=$(MODEL) bash benchmarks/ablation.sh
	$(BIN)/python benchmarks/collect_runs.py runs/ablation/* --out $(RESULTS)/sweeps/ablation

# The full report on the shipped models (all quantization modes); about 10 minutes on 2 cores.
# `make bench` measures everything where the toolchain is installed (`make install`); where only the runtime is
# (`make install-runtime`), it runs the latency rows that need no torch on folders exported elsewhere (bench-runtime).
bench:
	@if test -f $(RUNTIME_STAMP) && ! test -f $(STAMP); then $(MAKE) --no-print-directory bench-runtime; \
	else $(MAKE) --no-print-directory bench-full; fi

bench-full: $(STAMP)
	$(BIN)/mtu-export bench $(SHIPPED) $(BASELINES) --parity $(RESULTS)/parity/parity.json --sparse $(SPARSE) \
	  --sparse-eval $(RESULTS)/sparse/eval/top2.json --out $(RESULTS) --overwrite

# The shipped 4-task model as the device runtimes take it, for bench-runtime: fp32 .onnx (the reference), static int8
# as ONNX Runtime Mobile .ort, and w8a16 at batch 1 (the NPU-style graph) as .ort. Run where torch is installed, then
# copy out/device to the device.
DEVICE_DIR := out/device
DEVICE_EXPORTS ?= $(DEVICE_DIR)/fp32 $(DEVICE_DIR)/static-int8-ort $(DEVICE_DIR)/w8a16-batch1-ort
bench-exports: $(STAMP)
	$(BIN)/mtu-export onnx $(SHIPPED) --task all --image-count 0 --out $(DEVICE_DIR)/fp32 --overwrite
	$(BIN)/mtu-export onnx $(SHIPPED) --task all --image-count 0 --quantize static-int8 --format ort \
	  --out $(DEVICE_DIR)/static-int8-ort --overwrite
	$(BIN)/mtu-export onnx $(SHIPPED) --task all --image-count 0 --quantize w8a16 --batch 1 --format ort \
	  --out $(DEVICE_DIR)/w8a16-batch1-ort --overwrite

# Each folder of DEVICE_EXPORTS against the first, torch-free -> benchmarks/results/device/device.{json,md}
bench-runtime:
	@for f in $(DEVICE_EXPORTS); do test -f "$$f/manifest.json" || { echo "no exported folder $$f: run \
	'make bench-exports' where torch is installed and copy $(DEVICE_DIR) here, or set DEVICE_EXPORTS"; exit 1; }; done
	$(BIN)/python -m mtu_export.bench.device $(DEVICE_EXPORTS) --out $(RESULTS)/device --overwrite

# The CI gate: the same measurements (quick settings), checked against benchmarks/baseline.json.
bench-check: $(STAMP)
	$(BIN)/mtu-export bench $(SHIPPED) $(BASELINES) --sparse $(SPARSE) --out out/bench-check --modes dynamic-int8,static-int8 --image-count 1 \
	  --rounds 4 --pairs 50 --check benchmarks/baseline.json --overwrite

bench-train: $(STAMP)
	$(BIN)/mtu-export bench-train $(MODEL) --out $(RESULTS)/train_step.json --overwrite

# Peak memory of a few training steps on 2,000- and 20,000-row on-disk datasets (the latent cache build included);
# the ratio should stay near 1. The committed run's two training runs took 28 s and 229 s ($(RESULTS)/data_memory.json);
# writing the two datasets comes on top (not timed).
# The torch-free on-device pipeline against `mtu-export generate`: installed size and import-to-image time / memory on
# the shipped t2i export -> benchmarks/results/ondevice.json
bench-ondevice: $(STAMP)
	$(BIN)/mtu-export onnx $(SHIPPED) --task t2i --image-count 0 --out out/ondevice/t2i --overwrite
	$(BIN)/python benchmarks/ondevice_footprint.py --export out/ondevice/t2i --out $(RESULTS)/ondevice.json

# w8a16 vs static int8 on the shipped model, per UNet call and end to end -> benchmarks/results/int8/w8a16_vs_*
bench-w8a16: $(STAMP)
	$(BIN)/python benchmarks/quantized_psnr.py --model $(SHIPPED) --work out/quantized --out $(RESULTS)/int8

bench-data: $(STAMP)
	$(BIN)/python benchmarks/data_memory.py --base $(MODEL) --out $(RESULTS)/data_memory.json

# Stable Diffusion v1.5 scale with random weights: the fold's cost claims (about 25 minutes, 8 GB of RAM on 2 cores),
# the sparse folds of top-2 and top-1 routing against single-task (GFLOPs and latency), then our exported graphs
# against optimum's and onnxruntime's optimizer (about 40 minutes, 20 GB), all into $(RESULTS)/sd15.{json,md}.
bench-sd15: $(STAMP)
	$(BIN)/python -m mtu_export.bench.sd15 --out $(RESULTS)
	$(BIN)/python -m mtu_export.bench.sd15 --sparse --out $(RESULTS)
	$(BIN)/python -m mtu_export.bench.peers --out $(RESULTS)
	$(BIN)/python -m mtu_export.bench.phone --out $(RESULTS)

# bench-sd15's third part alone: a 512x512, 20-step SD1.5-scale generation on device (fp32, static int8, w8a16) vs
# optimum's fp32 pipeline, peak RSS and time -> benchmarks/results/sd15_phone.{json,md} (about 30 minutes, 12 GB)
bench-phone: $(STAMP)
	$(BIN)/python -m mtu_export.bench.phone --out $(RESULTS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
