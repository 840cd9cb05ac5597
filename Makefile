# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both create (or reuse) the virtual environment $(VENV) with the test dependencies pinned
# by constraints.txt, and install retake-ops into it editable, compiling retake_ops._C in
# place: Python started anywhere, this checkout included, imports the same package.
# Only a change to the build inputs (setup.py, pyproject.toml, csrc/) or to the venv's
# inputs (this Makefile, the pins) compiles again.
# TORCH names the torch to install: the default is the CPU build available on the
# development machines; on a CUDA machine pass e.g. TORCH='torch==2.11.0'.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The test dependencies as ranges; constraints.txt pins them and all they pull in (accelerate: transformers'
# device_map loading, for the multi-device tests).
DEPS := numpy "triton>=3.6,<3.10" "transformers>=5.17,<6" accelerate pytest pytest-benchmark hypothesis \
	matplotlib av ninja setuptools
BUILD_INPUTS := setup.py pyproject.toml retake_ops/_build.py $(shell find csrc -type f)

.PHONY: venv install demo test bench wheel test-hf-min test-latest lock clean

$(VENV)/.deps: Makefile pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c constraints.txt "$(TORCH)" $(DEPS)
	touch $@

venv: $(VENV)/.deps

$(VENV)/.installed: $(VENV)/.deps $(BUILD_INPUTS)
	MAX_JOBS=$(JOBS) $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/retake-ops-demo $(ARGS)

test: install
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# benchmarks/conftest.py collects the bench_*.py files; `make test` never runs them.
bench: install
	$(VENV)/bin/pytest benchmarks -q --benchmark-columns=min,median,mean,rounds $(PYTEST_ARGS)

# The non-editable wheel (python_ref/ as retake_ops.ref, the compiled retake_ops._C) in dist/.
wheel: venv
	rm -rf dist
	MAX_JOBS=$(JOBS) $(PIP) wheel -q --no-build-isolation --no-deps -w dist .

# The Hugging Face tests (every tests/test_hf*.py) on the oldest supported transformers:
# constraints.txt with the pins of constraints-hf-min.txt in place of its own. retake-ops is
# installed editable without compiling (RETAKE_OPS_JIT=1 at build time) and loads the
# retake_ops._C that `make install` compiled in place for the same TORCH.
HF_MIN_VENV ?= .venv-hf-min
HF_MIN_NAMES := $(shell sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' constraints-hf-min.txt | sed 's/[-_.]/[-_.]/g' | paste -sd'|')

$(HF_MIN_VENV)/.deps: Makefile pyproject.toml constraints.txt constraints-hf-min.txt
	test -x $(HF_MIN_VENV)/bin/python || $(PYTHON) -m venv $(HF_MIN_VENV)
	{ grep -v -i -E '^($(HF_MIN_NAMES))==' constraints.txt; cat constraints-hf-min.txt; } > $(HF_MIN_VENV)/constraints.txt
	$(HF_MIN_VENV)/bin/pip install -q "$(TORCH)"
	$(HF_MIN_VENV)/bin/pip install -q -c $(HF_MIN_VENV)/constraints.txt "$(TORCH)" $(DEPS)
	RETAKE_OPS_JIT=1 $(HF_MIN_VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	touch $@

test-hf-min: install $(HF_MIN_VENV)/.deps
	$(HF_MIN_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(HF_MIN_VENV)/bin/pytest -q tests/test_hf*.py $(PYTEST_ARGS)

# The newest releases of every test dependency (torch stays $(TORCH)), built and tested in
# $(LATEST_VENV): finds the next upstream break before it reaches main. When it passes,
# `make lock` pins what it ran with into constraints.txt.
LATEST_VENV ?= .venv-latest

test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q "$(TORCH)"
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager "$(TORCH)" $(DEPS)
	MAX_JOBS=$(JOBS) $(LATEST_VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	$(LATEST_VENV)/bin/pip freeze --all --exclude pip --exclude torch --exclude retake-ops
	$(LATEST_VENV)/bin/pytest -q $(PYTEST_ARGS)

lock:
	{ sed '/^[^#]/,$$d' constraints.txt; \
	  $(LATEST_VENV)/bin/pip freeze --all --exclude pip --exclude torch --exclude retake-ops; } > constraints.txt.new
	if cmp -s constraints.txt.new constraints.txt; then rm constraints.txt.new; else mv constraints.txt.new constraints.txt; fi

clean:
	rm -rf build dist *.egg-info retake_ops/_C*.so $(VENV)/.installed

# The one prepared device run (README: GPU check): CUDA build, tests/gpu, compute-sanitizer, the
# report and the compiled kernels' resources, all into one folder. GPU_PYTHON=python3 runs it in
# that interpreter with the packages it has (no virtual environment, nothing downloaded).
# Its build step installs the checkout editable into that Python, the dry run too, so nothing
# needs `make install` first. ARGS="--dry-run" (or `make -n gpu-check`) checks every step
# without a GPU; ARGS="--out DIR".
GPU_PYTHON ?= $(PY)

.PHONY: gpu-check
gpu-check: $(if $(filter $(PY),$(GPU_PYTHON)),venv)
	+$(GPU_PYTHON) tools/gpu_check.py $(if $(findstring n,$(firstword -$(MAKEFLAGS))),--dry-run) $(ARGS)
