# The two commands the README documents. Both do their own set-up (scripts/setup.sh).
.PHONY: notebooks test lab setup lint bench colab-check

setup:
	@bash scripts/setup.sh

# Main job: execute notebooks 01-08 headless on the offline default; executed copies and figures go to outputs/.
notebooks: setup
	@.venv/bin/python scripts/run_notebooks.py --output-dir outputs

# Tests: ruff, the loralib unit tests and every notebook under nbval, offline.
test: setup
	@bash scripts/test.sh

# Open the series in JupyterLab inside the project's environment (http://localhost:8888; LAB_ARGS for more).
# Containers and many cloud machines run as root, which Jupyter refuses without --allow-root.
lab: setup
	@.venv/bin/jupyter lab --notebook-dir=notebooks $$( [ "$$(id -u)" = 0 ] && echo --allow-root ) $(LAB_ARGS)

lint: setup
	@.venv/bin/ruff check loralib tests benchmarks scripts notebooks

bench: setup
	@.venv/bin/python benchmarks/bench_speed.py --output-dir outputs/benchmarks

# Notebooks 01, 04 and 07 opened alone, as on Colab, in two prepared environments: Colab-like recent
# packages, and every runtime requirement at its floor (scripts/colab_check.py; ~20 min, not in `test`).
colab-check: setup
	@.venv/bin/python scripts/colab_check.py
