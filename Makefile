# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs xaibench, runs the main job on the embedded default
#   make test   creates .venv, installs xaibench with its test extras, runs the tests
# Both install detectron2's pinned pure-Python code (scripts/install_detectron2.py).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xaibench-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml scripts/install_detectron2.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,detectron2]"
	$(BIN)/python scripts/install_detectron2.py
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/xaibench demo --out outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) outputs
