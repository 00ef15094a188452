# The README's two commands: `make test` and `make demo`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: on CPU machines this resolves to the local 2.13.0 CPU wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	# the parameter-matched comparison study on CPU (configs/compare-cpu-tiny.toml): prepares the default
	# offline corpus, trains every variant, evaluates, and writes runs/compare-cpu-tiny/REPORT.md
	$(VENV)/bin/diffattn compare --preset cpu-tiny --out runs/compare-cpu-tiny

clean:
	rm -rf $(VENV) .pytest_cache
