# `make run` runs the whole pipeline on the embedded default; `make test` runs the test suite.
# Both install what is missing first (scripts/setup.sh is a no-op once done).
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup run test bench serve clean

setup:
	@bash scripts/setup.sh

run: setup
	dvc repro
	@sed -n '/^## Summary/,/^## Per class/{/^## Per class/!p}' reports/evaluation.md  # all metrics: dvc metrics show

test: setup
	ruff check .
	mypy  # headstart/ and tasks/ ([tool.mypy] in pyproject.toml)
	pytest -n auto --dist loadfile  # one worker per core, each test file on one worker (its fixtures built once)

bench: setup
	python bench/features_bench.py

serve: setup
	bash scripts/serve.sh

clean:
	rm -rf data/raw data/split data/backbone data/features models live reports/figures
