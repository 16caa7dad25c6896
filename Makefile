# Two entry points for a new user on a fresh machine:
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run the test suite
# Set-up pins the CPU wheel torch==2.13.0 (on this machine it lies on disk). A GPU user
# installs a CUDA torch into the venv first (or sets TORCH_SPEC); the package itself only
# asks for a range, which any recent CUDA build satisfies.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

demo: setup
	$(VENV)/bin/synthlesion demo --out $(DEMO_DIR) --overwrite

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check synthlesion training scripts tests
	$(VENV)/bin/ruff format --check synthlesion training scripts tests

clean:
	rm -rf $(VENV) runs .pytest_cache
