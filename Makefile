# The two commands a fresh machine needs: `make demo` (the main job) and `make test`.
.PHONY: setup test lint demo bench

setup:
	bash scripts/setup.sh

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

test: lint
	.venv/bin/python -m pytest -q

demo: setup
	bash scripts/fashion-mnist.sh
	.venv/bin/dispersive demo

bench: setup
	.venv/bin/python benchmarks/run_all.py
