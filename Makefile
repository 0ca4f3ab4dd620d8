# CIFAR-10 ResNet: the table of contents. `make` lists the targets; each runs one script, the variables as its flags.

DEVICE   ?= auto
MODEL    ?= resnet18
DATASET  ?= cifar10
EPOCHS   ?= 40
BATCH    ?= 512
DATA_DIR ?= data
RUN_DIR  ?= runs/$(MODEL)
IMG      ?= test/0_3.jpg
OUT      ?= .gpu-data/results
ARCHIVE  ?=
MD5      ?=
NPROC    ?=
RUNS     ?=
ARGS     ?=
CIFAR_URL ?=
CHECKPOINT ?=
HOST     ?= 127.0.0.1
PORT     ?= 8000

# Python environment: the active virtualenv or conda env, else .venv here (made on first use, so a system
# Python that refuses pip installs is never touched). Install stamps, redone when a requirements file changes:
ENV := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX),.venv)
PYTHON := $(ENV)/bin/python
STAMP := .make/$(subst /,_,$(abspath $(ENV)))
# Every install asks for the torch already there (none in a fresh env) by its exact version, so pip keeps the torch
# that torch_npu, or a CUDA or CPU build, is paired with, and picks the torchvision that goes with it.
KEEP_TORCH = $(shell $(PYTHON) -c "import importlib.metadata as m; \
	print(*[f'torch=={d.version}' for d in m.distributions(name='torch')][:1])")
# Where pip cannot (a mirror with no torchvision built for it), its last line names that torchvision: 0.(minor+15).patch
# for torch 2.minor.patch, a local label (+cpu) kept; the code reaches the shell in the environment, a short pip line.
OR_NAME_TORCHVISION = $(if $(KEEP_TORCH),|| $(PYTHON) -c "$$NAME_TORCHVISION")
export NAME_TORCHVISION = import importlib.metadata as m; t = m.version('torch'); v, plus, label = t.partition('+'); \
	_, minor, patch = v.split('.')[:3]; tv = f'0.{int(minor) + 15}.{patch}{plus}{label}'; \
	index = f' --index-url https://download.pytorch.org/whl/{label}' if label else ''; \
	raise SystemExit(f'error: pip could not install beside torch {t}, which is kept; the torchvision that goes \
	with it is {tv}: install it with $(PYTHON) -m pip install torchvision=={tv}{index}')

# $(call given,VAR,--flag): --flag 'value' if VAR is given (or in the environment). Names are quoted, so one with
# spaces or brackets arrives whole; the scripts check every value. MODEL, DATASET, EPOCHS and BATCH are
# train.py's defaults, passed only when given: a resumed run keeps its own.
given = $(if $(filter command line environment,$(origin $(1))),$(2) '$($(1))')
TRAIN_FLAGS := $(strip $(call given,MODEL,--model) $(call given,DATASET,--dataset) --device $(DEVICE) --data-dir '$(DATA_DIR)' \
	--out-dir '$(RUN_DIR)' $(call given,EPOCHS,--epochs) $(call given,BATCH,--batch-size))
# NPROC=N: N processes under torchrun (DDP). torchrun answers NPROC=0 with a traceback: make checks this one value.
nondigits = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))
$(if $(call nondigits,$(NPROC))$(filter 0%,$(NPROC)),$(error NPROC=$(NPROC): the number of processes to start, a whole number from 1))
LAUNCH := $(if $(NPROC),$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC),$(PYTHON))
# test.py and export.py use the data the run trained on unless DATA_DIR (or, for test.py, DATASET) is given;
# predict.py and gui.py the newest run's best.pth unless MODEL or RUN_DIR is, and predict.py the CPU unless DEVICE is.
PREDICT_FLAGS := $(if $(filter command line environment,$(origin RUN_DIR) $(origin MODEL)),--checkpoint '$(RUN_DIR)/best.pth')
# web.py and bench_web.py serve RUN_DIR's best.pth, or CHECKPOINT.
WEB_FLAGS = --checkpoint '$(or $(CHECKPOINT),$(RUN_DIR)/best.pth)' --device $(DEVICE)

.DEFAULT_GOAL := help
.PHONY: help install install-dev install-gui install-web install-extra data train eval bench speedrun plot predict gui \
	export web bench-web gpu-check test test-fast clean
help: ## list the targets and the variables they take
	@echo "usage: make TARGET [VAR=value ...]"; echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-14s %s\n", $$1, $$2}'
	@echo; echo "variables: DEVICE=$(DEVICE) (auto|npu|cuda|mps|cpu)  MODEL=$(MODEL)  EPOCHS=$(EPOCHS)  BATCH=$(BATCH)"
	@echo "           DATASET=$(DATASET) (cifar10|cifar100|folder)  DATA_DIR=$(DATA_DIR)  RUN_DIR=$(RUN_DIR)"
	@echo "           NPROC=$(NPROC) (processes under torchrun)  IMG=$(IMG) (predict, gui)  OUT=$(OUT) (gpu-check)"
	@echo "           CHECKPOINT=$(CHECKPOINT) (web, bench-web)  HOST=$(HOST)  PORT=$(PORT) (web)"
	@echo "           RUNS=$(RUNS) (speedrun: how many runs, 3; plot: run folders to overlay)"
	@echo "           ARCHIVE=$(ARCHIVE)  MD5=$(MD5)  CIFAR_URL=$(CIFAR_URL) (data: a local archive or a mirror)"
	@echo "           ARGS=\"$(ARGS)\" (extra flags for the script)"

$(ENV)/bin/python:
	python3 -m venv $(ENV)
$(STAMP).run: requirements.txt | $(ENV)/bin/python
	$(PYTHON) -m pip install -r $< $(KEEP_TORCH) $(OR_NAME_TORCHVISION)
	@mkdir -p .make && touch $@
$(STAMP).%: requirements-%.txt requirements.txt | $(ENV)/bin/python
	$(PYTHON) -m pip install -r $< $(KEEP_TORCH) $(OR_NAME_TORCHVISION)
	@mkdir -p .make && touch $@
install: $(STAMP).run ## set up the Python environment (active venv/conda env, else .venv)
install-dev: $(STAMP).dev ## install, plus what the tests need
install-gui: $(STAMP).gui ## install Qt for Python (PySide6) for the desktop window
install-web: $(STAMP).web ## install FastAPI and uvicorn for the web page (web.py)
install-extra: $(STAMP).extra ## install the optional extras (matplotlib for plots)
data: install ## fetch and verify DATASET into DATA_DIR (offline: ARCHIVE=path, MD5=, or CIFAR_URL=); samples in test/
	$(PYTHON) data.py --dataset $(DATASET) --data-dir '$(DATA_DIR)' $(if $(ARCHIVE),--archive '$(ARCHIVE)') \
		$(if $(MD5),--md5 '$(MD5)') $(if $(CIFAR_URL),--url '$(CIFAR_URL)')
train: install data ## train MODEL on DEVICE into RUN_DIR (EPOCHS, BATCH, NPROC; ARGS="--resume" continues)
	$(LAUNCH) train.py $(TRAIN_FLAGS) $(ARGS)
eval: install ## evaluate RUN_DIR/best.pth: accuracy, per class, confusion matrix (+ confusion.png with matplotlib)
	$(PYTHON) test.py --checkpoint '$(RUN_DIR)/best.pth' --device $(DEVICE) --confusion-png '$(RUN_DIR)/confusion.png' \
		$(call given,DATA_DIR,--data-dir) $(call given,DATASET,--dataset) $(ARGS)
predict: install ## classify IMG (a picture or a folder) with the newest run's best.pth (or RUN_DIR's)
	$(PYTHON) predict.py '$(IMG)' $(PREDICT_FLAGS) $(call given,DEVICE,--device) $(ARGS)
bench: install ## time training, evaluation and loading against the tutorials' pipeline (MODEL, DEVICE, BATCH; ARGS: bench.py flags, then -- and train.py's step flags)
	$(PYTHON) bench.py --model $(MODEL) --device $(DEVICE) $(call given,BATCH,--batch-size) $(ARGS)
speedrun: install data ## train the fast recipe RUNS times (3), timed to accuracy (MODEL, DEVICE, DATA_DIR; ARGS: train.py flags)
	$(PYTHON) bench.py --speedrun $(or $(RUNS),3) --model $(MODEL) --device $(DEVICE) --data-dir '$(DATA_DIR)' -- $(ARGS)
plot: install install-extra ## draw RUN_DIR/curves.png (RUNS="runs/a runs/b" overlays several runs)
	$(PYTHON) plot.py $(or $(RUNS),'$(RUN_DIR)') $(ARGS)
gui: install install-gui ## open the desktop window (IMG= opens a picture at once; newest run's best.pth)
	$(PYTHON) gui.py $(PREDICT_FLAGS) $(if $(filter command line,$(origin IMG)),'$(IMG)') $(ARGS)
web: install install-web ## serve a page and a JSON API for RUN_DIR's best.pth (CHECKPOINT=, HOST=, PORT=; ssh -L to reach it)
	$(PYTHON) web.py $(WEB_FLAGS) --host '$(HOST)' --port '$(PORT)' $(ARGS)
bench-web: install install-web ## time web.py's API with 1, 8 and 32 clients, batching on and off, next to predict.py's cold start
	$(PYTHON) bench_web.py $(WEB_FLAGS) $(ARGS)
export: install install-extra ## write RUN_DIR/model.onnx from RUN_DIR/best.pth, checked against PyTorch with onnxruntime
	$(PYTHON) export.py --checkpoint '$(RUN_DIR)/best.pth' $(call given,DATA_DIR,--data-dir) $(ARGS)
# The GPU machine's python3 may be no active environment's: gpu_check.py then runs on it and hands it to its makes.
gpu-check: ## on a CUDA GPU: bench, speedrun, train, airbench94, each step timed out alone, into OUT (gpu_check.py)
	$(or $(wildcard $(PYTHON)),python3) gpu_check.py '$(OUT)' $(ARGS)

# A worker per core, one thread each (tiny batches keep threads waiting); worksteal: no core idles at the end.
PYTEST := OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n auto --dist worksteal
test: install-dev install-gui install-extra install-web ## run the whole test suite (what CI runs)
	$(PYTEST) --durations=10 tests/ $(ARGS)
test-fast: install-dev install-gui install-extra install-web ## run the tests that start no process and train no whole run: the tier for an edit loop
	$(PYTEST) -m "not slow" tests/ $(ARGS)
clean: ## remove caches and install stamps (keeps data/, runs/, test/ and .venv)
	rm -rf .make .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
