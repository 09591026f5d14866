# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs what it needs on first use. TORCH_SPEC picks the torch build
# installed when the environment has none (e.g. TORCH_SPEC="torch==2.13.0" for the CPU wheel here;
# on a CUDA machine install your CUDA build of torch into .venv first and it is kept).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastitm-installed

WHEEL_DIR := build/wheel-check

.PHONY: demo test bench clean wheel-check gpu-wheels gpu-check

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q setuptools wheel pybind11 cmake ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/fastitm demo

# The GPU machine's Triton (3.6.0), installed beside the environment's own for the sm_90 compile check
# (tests/test_kernel_compile.py); without a package registry the check says so and skips.
TRITON_GPU_VERSION ?= 3.6.0
TRITON_GPU_DIR := $(VENV)/triton-$(TRITON_GPU_VERSION)

$(TRITON_GPU_DIR)/.installed: $(STAMP)
	$(PY) -m pip install -q --no-deps --no-compile --target $(TRITON_GPU_DIR) "triton==$(TRITON_GPU_VERSION)" \
		&& touch $@ || echo "triton $(TRITON_GPU_VERSION) could not be installed: its compile check will skip"

# One pytest-xdist worker per core (at most TEST_JOBS), each test file on one worker (its module
# fixtures built once); the workers split the cores' threads between them (conftest.py).
TEST_JOBS ?= 4
test: $(STAMP) $(TRITON_GPU_DIR)/.installed
	FASTITM_TRITON_GPU=$(TRITON_GPU_DIR) $(PY) -m pytest -q -n auto --maxprocesses $(TEST_JOBS) --dist loadfile tests

# A normal (non-editable) install from a wheel, into a fresh environment, used from outside the
# source tree: what a user of `pip install fastitm` gets (package data, the embedded model, the native
# extension, fastitm.kernels). Its dependencies are not installed a second time (two minutes of CI):
# a .pth file puts .venv's site-packages after the new environment's own (the editable install's hook
# there is not run from a .pth-added folder), and `pip check` checks the wheel's requirements on them.
WHEEL_SITE = $(WHEEL_DIR)/venv/lib/python$(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')/site-packages
wheel-check: $(STAMP)
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)/run
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEEL_DIR)/dist .
	$(PY) -m venv --without-pip $(WHEEL_DIR)/venv
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > $(WHEEL_SITE)/zz-deps-from-venv.pth
	$(PY) -m pip --python $(WHEEL_DIR)/venv/bin/python install -q --no-deps $(WHEEL_DIR)/dist/fastitm-*.whl
	$(PY) -m pip --python $(WHEEL_DIR)/venv/bin/python check
	cd $(WHEEL_DIR)/run && ../venv/bin/python -I $(CURDIR)/.ci/wheel_smoke.py

bench: $(STAMP)
	$(PY) -m pytest -q -s bench

clean:
	rm -rf build .pytest_cache .benchmarks fastitm/_C*.so fastitm-demo fastitm.egg-info

# GPU windows are short: `make gpu-wheels` (here, with the package registry) puts into .whl/ the wheels
# a CUDA machine lacks; `make gpu-check OUT=dir` (there, offline, in one call of at most BUDGET seconds,
# 480 by default) unpacks them, links fastitm, and runs the stages in order of value (ceilings, kernel
# correctness, the SD 2.1-base headline, fused ops vs SDPA, levers, the GPU tests), rewriting
# OUT/gpu-report.md and .json after each stage; gpu-logs.tar.gz comes last.
# It uses the machine's own python3 when that has torch (the CUDA machine), else .venv (a dry run
# here: the GPU stages are reported as skipped).
# STAGES=install,headline runs only those; LIMITS="headline=300" fixes stage limits (the two-call form).
OUT ?= gpu-report
BUDGET ?= 480
gpu-wheels: $(STAMP)
	$(PY) bench/gpu_check.py wheels --dest .whl

gpu-check:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then py=$(PYTHON); \
	else $(MAKE) --no-print-directory $(STAMP) && py=$(PY); fi; \
	$$py bench/gpu_check.py run --out "$(OUT)" --wheels .whl --budget $(BUDGET) $(if $(STAGES),--only "$(STAGES)") \
	  $(foreach l,$(LIMITS),--limit $(l))
