PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow lint demo base-model eval-base clean

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
