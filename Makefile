# make test : set up .venv (torch + deps), build genfast, type-check genfast/ with mypy, run the
#             whole test suite.
# make bench: same set-up, then the benchmark suite on the device present (tables + plot).
# make demo : same set-up, then `python -m genfast.demo` (writes demo_out/*.png).
VENV    ?= .venv
PYTHON  ?= python3
TORCH   ?= torch==2.14.1
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.genfast-deps-2
# Parallel compile jobs for the extension (setup.py's default is every usable core).
JOBS    ?= $(shell nproc 2>/dev/null || echo 2)
# pytest-xdist workers for `make test`: one per core, at most 4 (each worker imports torch and
# keeps its own compile caches). On the 2-core CI VM two workers halved the suite's time (38:54
# -> 19:01 on an AVX2 host; most of it is single-threaded Triton-interpreter Python).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
# Each worker's torch runs an OpenMP pool of one thread per core, so the workers oversubscribe
# the cores; OpenMP threads that spin while they wait then take the cores from the other worker.
# Passive waiting (threads sleep at once) kept the parallel code paths and cut the ATen-heavy
# test files' time 2.9x on the 2-core CI VM (tests/test_conv_transpose_gemm.py +
# test_eager_entries.py: 61.7 s -> 21.3 s; the Triton-interpreter-bound test_conv_act.py:
# 107 s -> 99 s). Tests only: `make bench` times the default policy, as users run.
TEST_OMP_WAIT_POLICY ?= PASSIVE
PYTEST_ARGS  ?= --durations=25

.PHONY: test bench build setup demo typecheck clean triton36

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)" triton numpy pybind11 ninja pytest pytest-benchmark pytest-xdist mypy matplotlib tqdm scikit-learn
	touch $(STAMP)

setup: $(STAMP)

build: setup
	MAX_JOBS=$(JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m genfast.info

typecheck: setup
	$(PY) -m mypy

# Triton 3.6.0 (the GPU machine's version) beside the venv's, for tests/test_compile_sm90.py;
# when pip cannot fetch it the test says so and skips.
triton36:
	test -f .triton36/triton/__init__.py || $(PY) -m pip install -q --no-deps --target .triton36 triton==3.6.0 \
	  || echo "triton==3.6.0 not installable here: its sm_90 compile check will be skipped"

test: build typecheck triton36
	OMP_WAIT_POLICY=$(TEST_OMP_WAIT_POLICY) $(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS) tests

bench: build
	$(PY) -m benchmarks.run_all

clean:
	rm -rf build genfast/*.so genfast/_build_info.py *.egg-info .triton36

demo: build
	$(PY) -m genfast.demo --out demo_out
