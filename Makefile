# stepdistill: `make demo` runs the main job on the tiny default, `make test` runs the test suite.
# Both create .venv on first use. On a GPU machine install a CUDA torch first, e.g.
#   make install TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"
SHELL := /bin/bash
PY := .venv/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := .venv/.installed

.PHONY: install demo test test-slow lint clean

$(STAMP): pyproject.toml scripts/deps.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	eval $(PY) -m pip install -q $$($(PY) scripts/deps.py test)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m scripts.demo

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf .venv runs outputs .pytest_cache
