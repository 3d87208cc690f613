# boat-mm task runner. `make demo` and `make test` are the two commands of
# the README; both set up .venv first (seconds when it is already there).
PY := .venv/bin/python

.PHONY: setup test demo bench clean-venv

setup:
	bash tools/setup_env.sh

test: setup
	$(PY) -m pytest tests

demo: setup
	bash tools/demo.sh

bench: setup
	$(PY) benchmarks/fsla.py

clean-venv:
	rm -rf .venv
