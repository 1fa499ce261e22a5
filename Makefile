# `make train` and `make test` each set up .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test tensorboard clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) cli.py train --epochs 100

# Two pytest processes (pytest-xdist), each test file whole in one of them (its module fixtures built once): most
# tests wait on subprocesses, kills and timeouts, so two overlap well even on 2 cores.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 2 --dist loadfile

# The viewer is an optional extra (training writes event files without it); it serves http://localhost:6006
tensorboard: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[tensorboard]'
	$(VENV)/bin/tensorboard --logdir runs

clean:
	rm -rf $(VENV) *.egg-info
