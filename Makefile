# make test : set up .venv (torch + deps), build genfast, type-check genfast/ with mypy, run the
#             whole test suite.
# make bench: same set-up, then the benchmark suite on the device present (tables + plot).
# make demo : same set-up, then `python -m genfast.demo` (writes demo_out/*.png).
VENV    ?= .venv
PYTHON  ?= python3
TORCH   ?= torch==2.14.1
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.genfast-deps
# Parallel compile jobs for the extension (setup.py's default is every usable core).
JOBS    ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: test bench build setup demo typecheck clean

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)" triton numpy pybind11 ninja pytest mypy matplotlib tqdm scikit-learn
	touch $(STAMP)

setup: $(STAMP)

build: setup
	MAX_JOBS=$(JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m genfast.info

typecheck: setup
	$(PY) -m mypy

test: build typecheck
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m benchmarks.run_all

clean:
	rm -rf build genfast/*.so genfast/_build_info.py *.egg-info

demo: build
	$(PY) -m genfast.demo --out demo_out
