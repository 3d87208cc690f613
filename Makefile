# boat-mm task runner. `make demo` and `make test` are the two commands of
# the README; both set up .venv first (seconds when it is already there).
PY := .venv/bin/python

.PHONY: setup test lint demo bench clean-venv

setup:
	bash tools/setup_env.sh

test: setup
	$(PY) -m pytest tests

# flake8, isort and yapf as setup.cfg configures them (also the hooks of
# .pre-commit-config.yaml); `make lint` changes nothing, it reports.
LINT_PATHS := boat_mm tools tests benchmarks configs setup.py
lint: setup
	$(PY) -m flake8 $(LINT_PATHS)
	$(PY) -m isort --check-only --diff $(LINT_PATHS)
	$(PY) -m yapf --diff --recursive $(LINT_PATHS)

demo: setup
	bash tools/demo.sh

bench: setup
	$(PY) benchmarks/fsla.py

clean-venv:
	rm -rf .venv
