# The two commands of the README's quick start: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: demo test lint clean

.venv/.installed: requirements.txt requirements-dev.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: .venv/.installed
	$(PY) reproduce.py --preset demo

test: .venv/.installed lint
	$(PY) -m pytest -q

lint: .venv/.installed
	$(PY) -m ruff check .

clean:
	rm -rf runs results .pytest_cache
