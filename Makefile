# Everything a fresh machine needs, in two commands:
#   make demo   set up, generate the toy data, train, evaluate
#   make test   set up, style check, CUDA compile check, test suite
# Set-up lives in .venv inside the checkout; a second run reuses it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
JOBS ?= $(shell nproc)
DEPS_STAMP := $(VENV)/.deps-installed
EXT_STAMP := $(VENV)/.ext-built
EXT_SOURCES := setup.py $(shell find ddetr_plugin/ops/csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
DEMO_CONFIG := configs/toy/deformable-detr_toy.py
DEMO_WORK_DIR := work_dirs/toy

.PHONY: setup demo test lint cuda-check convergence clean

setup: $(EXT_STAMP)

$(DEPS_STAMP): $(CONSTRAINTS) requirements/runtime.txt requirements/tests.txt \
		requirements/deploy.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0 setuptools==80.9.0 wheel ninja
	$(PIP) install -q -c $(CONSTRAINTS) mmengine==0.10.7
	# mmcv has no wheel for this torch: built from source with its ops (about
	# 11 minutes on 2 cores the first time, then from pip's wheel cache).
	MMCV_WITH_OPS=1 MAX_JOBS=$(JOBS) $(PIP) install -q -c $(CONSTRAINTS) \
		--no-build-isolation mmcv==2.1.0
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/runtime.txt \
		-r requirements/tests.txt -r requirements/deploy.txt
	touch $@

$(EXT_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	MAX_JOBS=$(JOBS) $(PIP) install -q -c $(CONSTRAINTS) --no-deps \
		--no-build-isolation -e .
	$(BIN)/python -c "import ddetr_plugin, ddetr_plugin.ops as o; assert o.extension_loaded(), o.extension_error()"
	touch $@

demo: setup
	$(BIN)/python tools/misc/make_toy_dataset.py data/toy
	# One thread each: on two shared cores, OpenMP threads mostly wait for
	# each other. --resume continues an interrupted run (a finished one
	# returns at once).
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python tools/train.py \
		$(DEMO_CONFIG) --work-dir $(DEMO_WORK_DIR) --resume
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python tools/test.py \
		$(DEMO_CONFIG) "$$(cat $(DEMO_WORK_DIR)/last_checkpoint)" \
		--work-dir $(DEMO_WORK_DIR) --show-dir $(CURDIR)/$(DEMO_WORK_DIR)/vis \
		--cfg-options \
		test_evaluator.outfile_prefix=$(CURDIR)/$(DEMO_WORK_DIR)/results
	$(BIN)/python tools/analysis_tools/plot_training.py $(DEMO_WORK_DIR)
	# Where the model looks: sampling points of two val images' detections.
	for image in 000000 000001; do \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python \
			tools/analysis_tools/vis_sampling_points.py \
			data/toy/val/$$image.png $(DEMO_CONFIG) \
			"$$(cat $(DEMO_WORK_DIR)/last_checkpoint)" \
			--out-dir $(DEMO_WORK_DIR)/sampling_points \
			--encoder-pixel 64 64 || exit 1; \
	done

# The convergence study of docs/convergence.md (not part of make test): DETR,
# Conditional DETR and Deformable DETR (plain; refinement + two-stage) on the
# toy data, the same schedule each, two runs at a time; about an hour on two
# cores.
convergence: setup
	bash tools/misc/convergence_study.sh data/toy work_dirs/convergence

lint: setup
	$(BIN)/ruff check ddetr_plugin tools tests configs demo setup.py
	$(BIN)/isort --check-only --diff ddetr_plugin tools tests configs demo setup.py
	$(BIN)/yapf --diff --recursive --parallel ddetr_plugin tools tests configs demo setup.py

cuda-check: setup
	$(BIN)/python tools/misc/cuda_compile_check.py

# Two workers, one test file each at a time (module fixtures stay whole);
# most tests are single-threaded subprocess runs of the tools, so on two
# cores this halves the wall time. The files are handed out in the order
# tests/conftest.py collects them, the longest first (xdist's own order,
# most tests first, left the longest files for the end).
TEST_WORKERS ?= 2
test: setup lint cuda-check
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder tests

clean:
	rm -rf build *.egg-info ddetr_plugin/*.so $(EXT_STAMP)
