PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow lint demo base-model eval-base mtu-models parity clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: on this machine a local CPU wheel; an unpinned torch would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check mtu_export tests
	$(BIN)/ruff format --check mtu_export tests

DEMO := out/demo
TASKS := t2i edit sr inpaint

MODEL := models/shapes-base

# The main job (it grows into export + bench as those land): upcycle the shipped base model to 4 tasks, fold each
# task back into a plain diffusers pipeline (each fold checks itself against the routed model), report.
demo: $(STAMP)
	$(BIN)/mtu-export upcycle $(MODEL) --out $(DEMO)/mtu --tasks t2i,edit,sr,inpaint --experts 4 --overwrite
	for t in $(TASKS); do $(BIN)/mtu-export fold $(DEMO)/mtu --task $$t --out $(DEMO)/folded/$$t --overwrite || exit 1; done
	$(BIN)/mtu-export info $(DEMO)/mtu
	@echo "folded pipelines: $(DEMO)/folded/{$$(echo $(TASKS) | tr ' ' ',')}"

EVAL := $(MODEL)/eval
GUIDANCE ?= 3

# Train the shipped base model from its recipe (VAE, then text encoder + UNet); resumes from runs/shapes-base if an
# earlier run was interrupted (delete that folder to start afresh). About 80 minutes on 2 CPU cores. The new weights
# replace those in $(MODEL); its model card (README.md) and eval/ stay.
base-model: $(STAMP)
	$(BIN)/mtu-export pretrain --recipe models/shapes-base.toml --work runs/shapes-base --out runs/shapes-base/pipeline --overwrite
	mkdir -p $(MODEL) && cp -r runs/shapes-base/pipeline/. $(MODEL)/

# Measure it: VAE PSNR and text-to-image scene-reader accuracy on the held-out split and on unseen combinations.
eval-base: $(STAMP)
	$(BIN)/mtu-export eval $(MODEL) --split heldout --guidance $(GUIDANCE) --json $(EVAL)/heldout.json --grid $(EVAL)/heldout.png
	$(BIN)/mtu-export eval $(MODEL) --split unseen --guidance $(GUIDANCE) --json $(EVAL)/unseen.json --grid $(EVAL)/unseen.png

# The 4-task MTU model (N=4) and the four single-task baselines, from the shipped base model, same steps and the same
# rows per task (MTU: 16 rows of each task per step; a baseline: 16 rows of its task). Each run resumes in its work
# folder if interrupted; the baselines reuse the MTU run's VAE caches (same base, same examples).
RUNS := runs/mtu
TRAIN_STEPS ?= 2000
MTU_TRAIN := --steps $(TRAIN_STEPS) --lr 1e-4 --seed 0 --resume --overwrite

mtu-models: $(STAMP)
	$(BIN)/mtu-export train $(MODEL) --work $(RUNS)/work/mtu --out $(RUNS)/shapes-mtu --batch-size 64 $(MTU_TRAIN)
	for t in $(TASKS); do \
	  mkdir -p $(RUNS)/work/single-$$t && ln -f $(RUNS)/work/mtu/cache-$$t.safetensors $(RUNS)/work/single-$$t/ ; \
	  $(BIN)/mtu-export train $(MODEL) --single-task $$t --work $(RUNS)/work/single-$$t --out $(RUNS)/single-$$t \
	    --batch-size 16 $(MTU_TRAIN) || exit 1; \
	done

# MTU vs the single-task baselines on the held-out split (parity.json, parity.md, a grid per task).
PARITY_COUNT ?= 100
parity: $(STAMP)
	$(BIN)/mtu-export parity $(RUNS)/shapes-mtu $(foreach t,$(TASKS),--baseline $(t)=$(RUNS)/single-$(t)) \
	  --count $(PARITY_COUNT) --guidance $(GUIDANCE) --out benchmarks/results/parity --overwrite

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
