# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both create (or reuse) the virtual environment $(VENV) and install what is missing.
# TORCH names the torch to install: the default is the CPU build available on the
# development machines; on a CUDA machine pass e.g. TORCH='torch==2.11.0'.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := numpy "triton>=3.6,<3.10" "transformers>=5.17,<6" pytest pytest-benchmark hypothesis matplotlib av ninja

.PHONY: venv install demo test bench clean

$(VENV)/.deps: Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "$(TORCH)" $(DEPS)
	touch $@

venv: $(VENV)/.deps

# Non-editable on purpose: tests and the demo import the installed package, with
# python_ref/ shipped as retake_ops.ref and the compiled retake_ops._C inside it.
install: venv
	MAX_JOBS=$(JOBS) $(PIP) install -q --no-build-isolation --no-deps .

# The installed command, not `python -m` from here: the checkout's retake_ops/ would shadow
# the installed package (no compiled library, no retake_ops.ref).
demo: install
	$(VENV)/bin/retake-ops-demo $(ARGS)

test: install
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/pytest benchmarks -q --benchmark-columns=min,median,mean,rounds $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info

# The one prepared device run (README: GPU check): CUDA build, tests/gpu, compute-sanitizer, the
# report and the compiled kernels' resources, all into one folder. GPU_PYTHON=python3 runs it in
# that interpreter with the packages it has (no virtual environment, nothing downloaded).
# ARGS="--dry-run" (or `make -n gpu-check`) checks every step without a GPU; ARGS="--out DIR".
GPU_PYTHON ?= $(PY)

.PHONY: gpu-check
gpu-check: $(if $(filter $(PY),$(GPU_PYTHON)),venv)
	+$(GPU_PYTHON) tools/gpu_check.py $(if $(findstring n,$(firstword -$(MAKEFLAGS))),--dry-run) $(ARGS)
