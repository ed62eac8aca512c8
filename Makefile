# flowdppo — the two commands a newcomer needs:
#   make demo   set up and run Flow-DPPO on the embedded shapes world (2 CPU cores, minutes)
#   make test   set up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
RUN    ?= demo

.PHONY: setup lint test test-slow demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/flowdppo train --config configs/shapes_demo.yaml --name $(RUN) --overwrite
	@echo "Report: runs/$(RUN)/report.md"

bench: setup
	$(PY) -m flowdppo.tools.bench losses

clean:
	rm -rf $(VENV) runs
