# Two commands on a fresh clone: `make hotdog` (set up, then run the hotdog recipe) and
# `make test` (set up, then run the tests). Both create .venv when it is missing or stale.
# Extra arguments go through ARGS, e.g.  make hotdog ARGS="--epochs 1"
PYTHON ?= python3
VENV := .venv
# The torch build fastft is developed and measured with; override for another, e.g. a CPU wheel.
TORCH ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

.PHONY: setup hotdog cifar test
setup: $(VENV)/.installed

hotdog: $(VENV)/.installed
	$(VENV)/bin/fastft hotdog $(ARGS)

cifar: $(VENV)/.installed
	$(VENV)/bin/fastft cifar $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(ARGS)
