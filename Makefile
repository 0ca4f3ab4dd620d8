# CIFAR-10 ResNet: the table of contents. `make` (or `make help`) lists the targets.
#
#   make train                                   # ResNet18, best device found
#   make data train DEVICE=npu MODEL=resnet50 EPOCHS=60
#   make eval                                    # test.py on $(RUN_DIR)/best.pth
#   make predict IMG=test/0_3.jpg
#   make data train DATASET=folder DATA_DIR=photos RUN_DIR=runs/photos   # your own pictures
#   make export                                  # $(RUN_DIR)/model.onnx, for onnxruntime or Ascend's ATC
#   make speedrun DEVICE=cuda RUNS=3             # time to accuracy of the fast recipe
#   make test                                    # the whole suite; make test-fast: the quick tests

DEVICE   ?= auto
MODEL    ?= resnet18
DATASET  ?= cifar10
EPOCHS   ?= 40
BATCH    ?= 512
DATA_DIR ?= data
RUN_DIR  ?= runs/$(MODEL)
IMG      ?= test/0_3.jpg
ARCHIVE  ?=
MD5      ?=
NPROC    ?=
RUNS     ?=
ARGS     ?=
CIFAR_URL ?=
CHECKPOINT ?=
HOST     ?= 127.0.0.1
PORT     ?= 8000

# Python environment: the active virtualenv or conda env if there is one,
# otherwise .venv here (created on first use, so a system Python that refuses
# pip installs is never touched).
ifdef VIRTUAL_ENV
ENV := $(VIRTUAL_ENV)
else ifdef CONDA_PREFIX
ENV := $(CONDA_PREFIX)
else
ENV := .venv
endif
PYTHON := $(ENV)/bin/python
# Install stamps live here, one per environment, and are redone when a
# requirements file changes.
STAMP := .make/$(subst /,_,$(abspath $(ENV)))

# $(call given,VAR,--flag): "--flag value" where VAR is given to make (or set in the environment), else nothing.
given = $(if $(filter command line environment,$(origin $(1))),$(2) $($(1)))
# MODEL, DATASET, EPOCHS and BATCH are train.py's own defaults (a test keeps them the same). They reach it only
# when given, as a resumed run keeps its own and notes each flag given that it does not take.
TRAIN_FLAGS := $(strip $(call given,MODEL,--model) $(call given,DATASET,--dataset) --device $(DEVICE) \
	--data-dir $(DATA_DIR) --out-dir $(RUN_DIR) $(call given,EPOCHS,--epochs) $(call given,BATCH,--batch-size))
# NPROC=N: N processes on this machine under torchrun (DDP), one device each.
LAUNCH := $(if $(NPROC),$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC),$(PYTHON))
# A mistyped DEVICE, NPROC, EPOCHS, BATCH or RUNS stops make in one line before any target runs: not after
# the data step has fetched the dataset, and not with torchrun's traceback (its answer to NPROC=0).
DEVICES := auto npu cuda mps cpu
ifneq ($(filter train eval bench speedrun predict web bench-web,$(MAKECMDGOALS)),)
ifneq ($(words $(DEVICE)) $(words $(filter $(DEVICES),$(DEVICE))),1 1)  # one word, and one of them
$(error DEVICE=$(DEVICE): the device to use, one of $(DEVICES))
endif
endif
# $(call whole_number,VAR,what it is): stops make unless VAR is a whole number from 1
whole_number = $(if $(shell echo '$($(1))' | grep -Ex '[1-9][0-9]*'),,$(error $(1)=$($(1)): $(2), a whole number from 1))
ifneq ($(filter train,$(MAKECMDGOALS)),)
$(if $(NPROC),$(call whole_number,NPROC,the number of processes to start))
$(call whole_number,EPOCHS,passes over the training set)
endif
ifneq ($(filter train bench,$(MAKECMDGOALS)),)
$(call whole_number,BATCH,images per step)
endif
ifneq ($(filter speedrun,$(MAKECMDGOALS)),)
$(if $(RUNS),$(call whole_number,RUNS,the number of runs))
endif
# A name with a space would reach the scripts as two arguments, and their error would name only half of it;
# one with a quote, a bracket, ; & | < > or a backquote would be read by the shell as its own syntax.
lparen := (
rparen := )
SHELL_SYNTAX := ' " ` ; & | < > $(lparen) $(rparen)
$(foreach v,MODEL DATASET DATA_DIR RUN_DIR IMG ARCHIVE CHECKPOINT,$(if $(word 2,$($(v))),$(error $(v)=$($(v)): make passes a name with \
	spaces as two; choose one without, or run the script with the name in quotes))$(if $(strip $(foreach \
	c,$(SHELL_SYNTAX),$(findstring $(c),$($(v))))),$(error $(v)=$($(v)): the shell would read $(strip $(foreach \
	c,$(SHELL_SYNTAX),$(findstring $(c),$($(v))))) in the name as its own syntax; choose a name without, or run \
	the script with the name in quotes)))
# test.py and export.py use the data the run trained on unless DATA_DIR (or, for test.py, DATASET) is given here.
RUN_DATA := $(call given,DATA_DIR,--data-dir)
EVAL_FLAGS := --checkpoint $(RUN_DIR)/best.pth --device $(DEVICE) --confusion-png $(RUN_DIR)/confusion.png \
	$(RUN_DATA) $(call given,DATASET,--dataset)
# predict.py and gui.py pick the newest run's best.pth unless MODEL or RUN_DIR is given here.
PREDICT_FLAGS := $(if $(filter command line environment,$(origin RUN_DIR) $(origin MODEL)),--checkpoint $(RUN_DIR)/best.pth)
# gui.py opens a picture at once only when IMG is given.
GUI_FLAGS := $(PREDICT_FLAGS) $(if $(filter command line,$(origin IMG)),$(IMG))
# predict.py answers on the CPU, before an accelerator would have started, unless DEVICE is given here.
PREDICT_DEVICE := $(call given,DEVICE,--device)

.DEFAULT_GOAL := help
.PHONY: help install install-dev install-gui install-extra install-web data train eval bench speedrun plot predict gui \
	export web bench-web test test-fast clean

help: ## list the targets and the variables they take
	@echo "usage: make TARGET [VAR=value ...]"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-14s %s\n", $$1, $$2}'
	@echo
	@echo "variables: DEVICE=$(DEVICE) (auto|npu|cuda|mps|cpu)  MODEL=$(MODEL)  EPOCHS=$(EPOCHS)  BATCH=$(BATCH)"
	@echo "           DATASET=$(DATASET) (cifar10|cifar100|folder)  DATA_DIR=$(DATA_DIR)  RUN_DIR=$(RUN_DIR)"
	@echo "           NPROC=$(NPROC) (processes under torchrun)  IMG=$(IMG) (predict, gui)"
	@echo "           CHECKPOINT=$(CHECKPOINT)  HOST=$(HOST)  PORT=$(PORT) (web, bench-web)"
	@echo "           RUNS=$(RUNS) (speedrun: how many runs, 3; plot: run folders to overlay)"
	@echo "           ARCHIVE=$(ARCHIVE)  MD5=$(MD5)  CIFAR_URL=$(CIFAR_URL) (data: a local archive or a mirror)"
	@echo "           ARGS=\"$(ARGS)\" (extra flags for the script)"

$(ENV)/bin/python:
	python3 -m venv $(ENV)

$(STAMP).run: requirements.txt | $(ENV)/bin/python
	$(PYTHON) -m pip install -r requirements.txt
	@mkdir -p .make && touch $@

$(STAMP).dev: requirements.txt requirements-dev.txt | $(ENV)/bin/python
	$(PYTHON) -m pip install -r requirements-dev.txt
	@mkdir -p .make && touch $@ $(STAMP).run

$(STAMP).extra: requirements-extra.txt | $(ENV)/bin/python
	$(PYTHON) -m pip install -r requirements-extra.txt
	@mkdir -p .make && touch $@

$(STAMP).gui: requirements-gui.txt | $(ENV)/bin/python
	$(PYTHON) -m pip install -r requirements-gui.txt
	@mkdir -p .make && touch $@

install: $(STAMP).run ## set up the Python environment (active venv/conda env, else .venv)

install-dev: $(STAMP).dev ## install, plus what the tests need

install-gui: $(STAMP).gui ## install Qt for Python (PySide6) for the desktop window

$(STAMP).web: requirements-web.txt | $(ENV)/bin/python
	$(PYTHON) -m pip install -r requirements-web.txt
	@mkdir -p .make && touch $@

install-web: $(STAMP).web ## install FastAPI and uvicorn for the web page (web.py)

install-extra: $(STAMP).extra ## install the optional extras (matplotlib for plots)

data: install ## fetch and verify DATASET into DATA_DIR (offline: ARCHIVE=path, MD5=, or CIFAR_URL=); samples in test/
	$(PYTHON) data.py --dataset $(DATASET) --data-dir $(DATA_DIR) $(if $(ARCHIVE),--archive $(ARCHIVE)) \
		$(if $(MD5),--md5 $(MD5)) $(if $(CIFAR_URL),--url $(CIFAR_URL))

train: install data ## train MODEL on DEVICE into RUN_DIR (EPOCHS, BATCH, NPROC; ARGS="--resume" continues)
	$(LAUNCH) train.py $(TRAIN_FLAGS) $(ARGS)

eval: install ## evaluate RUN_DIR/best.pth: accuracy, per class, confusion matrix (+ confusion.png with matplotlib)
	$(PYTHON) test.py $(EVAL_FLAGS) $(ARGS)

predict: install ## classify IMG (a picture or a folder) with the newest run's best.pth (or RUN_DIR's)
	$(PYTHON) predict.py $(IMG) $(PREDICT_FLAGS) $(PREDICT_DEVICE) $(ARGS)

bench: install ## time training, evaluation and loading against the tutorials' pipeline (MODEL, DEVICE, BATCH; ARGS: bench.py flags, then -- and train.py's step flags)
	$(PYTHON) bench.py --model $(MODEL) --device $(DEVICE) $(call given,BATCH,--batch-size) $(ARGS)

speedrun: install data ## train the fast recipe RUNS times (3), timed to accuracy (MODEL, DEVICE, DATA_DIR; ARGS: train.py flags)
	$(PYTHON) bench.py --speedrun $(or $(RUNS),3) --model $(MODEL) --device $(DEVICE) --data-dir $(DATA_DIR) -- $(ARGS)

plot: install install-extra ## draw RUN_DIR/curves.png (RUNS="runs/a runs/b" overlays several runs)
	$(PYTHON) plot.py $(or $(RUNS),$(RUN_DIR)) $(ARGS)

gui: install install-gui ## open the desktop window (IMG= opens a picture at once; newest run's best.pth)
	$(PYTHON) gui.py $(GUI_FLAGS) $(ARGS)

# web.py and bench_web.py serve RUN_DIR's best.pth, or CHECKPOINT.
WEB_CHECKPOINT = --checkpoint $(or $(CHECKPOINT),$(RUN_DIR)/best.pth) --device $(DEVICE)

web: install install-web ## serve a page and a JSON API for RUN_DIR's best.pth (CHECKPOINT=, HOST=, PORT=; ssh -L to reach it)
	$(PYTHON) web.py $(WEB_CHECKPOINT) --host $(HOST) --port $(PORT) $(ARGS)

bench-web: install install-web ## time web.py's API with 1, 8 and 32 clients, batching on and off, next to predict.py's cold start
	$(PYTHON) bench_web.py $(WEB_CHECKPOINT) $(ARGS)

export: install install-extra ## write RUN_DIR/model.onnx from RUN_DIR/best.pth, checked against PyTorch with onnxruntime
	$(PYTHON) export.py --checkpoint $(RUN_DIR)/best.pth $(RUN_DATA) $(ARGS)

# A pytest worker per core (pytest-xdist), each computing on one thread: the tiny batches of the tests
# keep torch's threads waiting on each other, and two threads per worker would share the cores twice over.
# worksteal: a worker that runs out takes tests queued for another, so no core idles through a long last test.
PYTEST := OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n auto --dist worksteal

test: install-dev install-gui install-extra install-web ## run the whole test suite (what CI runs)
	$(PYTEST) --durations=10 tests/ $(ARGS)

test-fast: install-dev install-gui install-extra install-web ## run the tests that start no process and train no whole run: the tier for an edit loop
	$(PYTEST) -m "not slow" tests/ $(ARGS)

clean: ## remove caches and install stamps (keeps data/, runs/, test/ and .venv)
	rm -rf .make .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
