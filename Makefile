# The two commands of the README: `make demo` (the default Fashion-MNIST run) and `make test`.
VENV ?= .venv
OUT ?= runs/default
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-slow lint bench

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/cmpnas run --profile default --out $(OUT)

test:
	bash scripts/setup.sh --browser
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest -q -m "not slow" --durations=15

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m slow

bench: setup
	$(VENV)/bin/python benchmarks/run_all.py
