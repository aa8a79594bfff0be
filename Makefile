# stepdistill: `make demo` runs the main job on the tiny default, `make test` runs the test suite.
# Both create .venv on first use. On a GPU machine install a CUDA torch first, e.g.
#   make install TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"
SHELL := /bin/bash
PY := .venv/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := .venv/.installed

.PHONY: install demo test test-slow lint clean webui test-browser webui-screenshot rehearse

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

# The web UI on http://127.0.0.1:7860 (WEBUI_CONFIG=... for another model; see inference/webui.py).
WEBUI_CONFIG ?= configs/infer/tiny/t2v_distill_4step.json
webui: $(STAMP)
	$(PY) -m inference.webui --config $(WEBUI_CONFIG)

# The real-browser test of the web UI: installs Chromium if missing, then runs it (a missing browser fails here).
test-browser: $(STAMP)
	bash scripts/install_browser.sh
	WEBUI_BROWSER_REQUIRED=1 $(PY) -m pytest -m browser tests/test_webui.py

# Regenerates the committed screenshot from the shipped tiny distilled model.
webui-screenshot: $(STAMP)
	bash scripts/install_browser.sh
	WEBUI_BROWSER_REQUIRED=1 WEBUI_TEST_CONFIG=$(WEBUI_CONFIG) WEBUI_SCREENSHOT=benchmarks/results/webui_screenshot.png \
		$(PY) -m pytest -m browser tests/test_webui.py

# every real-model command of the README on mini Wan2.1 folders (CPU; REHEARSE_DIR keeps the outputs)
rehearse: $(STAMP)
	PYTHON=$(PY) bash scripts/rehearse.sh $(REHEARSE_DIR)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf .venv runs outputs .pytest_cache
