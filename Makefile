# The two commands a fresh machine needs: `make demo` (the main job) and `make test`.
.PHONY: setup data test lint demo bench gpu-check study study-save study-tables

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

# One CUDA GPU, under 8 minutes: loss accuracy and speed, SiT-B/2 and SiT-XL/2 steps (eager and
# compiled), Heun sampling, DDP over NCCL; writes docs/gpu-check.md and docs/gpu-check.json.
# Without CUDA it says so and exits 0.
gpu-check: setup
	.venv/bin/python benchmarks/gpu_check.py

# The Fashion-MNIST study of docs/results.md: one queue over its grids (hours on 2 cores;
# resumable: run it again to continue). The kept runs of results/ are restored first, each
# pool to its own folder, and count as finished: what this continues is what the study has not
# run yet (the screen's remaining seed-1 arms, the larger model, SiT-T/4, 15 runs; the
# contrastive grid, seed 2 of the long grid); no kept run is trained again. The confirmation
# stopped at 10 seeds (docs/results.md, "The answer"): seeds 10-19 are not queued.
study: setup data
	bash scripts/study-runs.sh restore
	.venv/bin/dispersive experiment configs/experiments/fmnist-screen.toml --jobs 2 --threads 1
	.venv/bin/dispersive experiment configs/experiments/fmnist-confirm.toml --seeds 0 1 2 3 4 \
	  --jobs 2 --threads 1
	.venv/bin/dispersive experiment configs/experiments/fmnist-confirm.toml --seeds 5 6 7 8 9 \
	  --jobs 2 --threads 1
	.venv/bin/dispersive experiment configs/experiments/fmnist-larger.toml --jobs 2 --threads 1
	.venv/bin/dispersive experiment configs/experiments/fmnist-variants.toml \
	  configs/experiments/fmnist-contrastive.toml configs/experiments/fmnist-lambda-tau.toml \
	  configs/experiments/fmnist-blocks.toml configs/experiments/fmnist-long.toml \
	  --jobs 2 --threads 1

# Keep the study's finished runs (without checkpoints) in results/ for the next machine. Never
# replaces a kept run: a rerun that differs from its kept copy is refused (exit status 1).
study-save:
	bash scripts/study-runs.sh save

# Every table of docs/results.md from the runs kept in results/, nothing trained: the grids'
# reports (Tables 2-4 and the screen's and confirmation's own, runs/experiments/<grid>/report.md)
# and scripts/study_tables.py all (the rest, in page order). 14 min from a fresh clone on 2
# busy cores, most of it the evaluation-noise table (features of all 70,000 images).
study-tables: setup data
	bash scripts/study-runs.sh restore
	.venv/bin/dispersive experiment configs/experiments/fmnist-screen.toml \
	  configs/experiments/fmnist-confirm.toml configs/experiments/fmnist-variants.toml \
	  configs/experiments/fmnist-contrastive.toml configs/experiments/fmnist-lambda-tau.toml \
	  configs/experiments/fmnist-blocks.toml configs/experiments/fmnist-long.toml --report-only
	.venv/bin/python scripts/study_tables.py all
