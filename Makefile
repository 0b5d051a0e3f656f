# The two commands of the README's quick start, `make demo` and `make test`; and `make gpu-check` for a lent GPU.
PY := .venv/bin/python
# The GPU check installs nothing (GPU machines are often offline): the venv's python if there is one, else the
# system's, with its preinstalled torch.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)

.PHONY: demo test lint clean gpu-check

.venv/.installed: requirements.txt requirements-dev.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: .venv/.installed
	$(PY) reproduce.py --preset demo

test: .venv/.installed lint
	$(PY) -m pytest -q

gpu-check:
	$(GPU_PY) gpu_check.py

lint: .venv/.installed
	$(PY) -m ruff check .

clean:
	rm -rf runs results .pytest_cache
