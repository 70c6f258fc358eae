# The two commands of the README: `make demo` (the default Fashion-MNIST run) and `make test`.
VENV ?= .venv
OUT ?= runs/default
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo full test test-slow lint bench

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/cmpnas run --profile default --out $(OUT)

# The evidence run (<= 90 min on 2 cores: 3 seeds, the family, the ranking protocol, the controls).
full: setup
	$(VENV)/bin/cmpnas run --profile full --out runs/full

test:
	bash scripts/setup.sh --browser
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q -m "not slow" --durations=15

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m slow

# Benchmarks write JSON to benchmarks/results/; run them on an otherwise idle machine.
# search_speed and serving need a finished `make demo` run in $(OUT) (gallery, supernet, R3 model); so do
# int8 and browser when given its models (README: the commands as run).
# The long ones run by hand (README): benchmarks/upgrade.py, benchmarks/family.py (after `make full`, whose
# gallery and baselines it reuses), benchmarks/compat_ablation.py, benchmarks/compat_objective.py,
# benchmarks/supernet_ablation.py; after `make full`: benchmarks/ranking_schedule.py, benchmarks/supernet_ranking.py,
# benchmarks/gap_schedule.py, benchmarks/estimator_noise.py.
bench: setup
	$(VENV)/bin/python benchmarks/latency_table.py
	$(VENV)/bin/python benchmarks/training_throughput.py
	$(VENV)/bin/python benchmarks/compat_fashion_mnist.py
	$(VENV)/bin/python benchmarks/search_speed.py --run $(OUT)
	$(VENV)/bin/python benchmarks/serving.py --gallery-model $(OUT)/gallery/model.safetensors \
		--query-model $(OUT)/retrain/R3/model.safetensors
