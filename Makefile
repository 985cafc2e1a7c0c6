# The two commands a fresh machine needs: `make demo` (the main job) and `make test`.
.PHONY: setup data test lint demo bench study study-save

setup:
	bash scripts/setup.sh

# Fashion-MNIST from Debian's package dataset-fashion-mnist (installed when missing).
data:
	bash scripts/fashion-mnist.sh

lint: setup
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/ruff format --check src tests benchmarks scripts

test: lint data
	.venv/bin/python -m pytest -q

# Baseline vs Dispersive Loss on Fashion-MNIST (2 CPU cores, under 20 minutes); writes a report.
demo: setup data
	.venv/bin/dispersive experiment configs/experiments/fmnist-demo.toml --jobs 2

bench: setup data
	.venv/bin/python benchmarks/run_all.py

# The Fashion-MNIST study of docs/results.md: one queue over five grids, shared runs trained
# once (hours on 2 cores; resumable: run it again to continue).
study: setup data
	bash scripts/study-runs.sh restore
	.venv/bin/dispersive experiment configs/experiments/fmnist-variants.toml \
	  configs/experiments/fmnist-contrastive.toml configs/experiments/fmnist-lambda-tau.toml \
	  configs/experiments/fmnist-blocks.toml configs/experiments/fmnist-long.toml \
	  --jobs 2 --threads 1

# Keep the study's finished runs (without checkpoints) in results/ for the next machine.
study-save:
	bash scripts/study-runs.sh save
