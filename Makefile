# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Extra flags for the demo, e.g. DEMO_FLAGS=--cpu_isa=AVX2 (see docs/results.md, "Same seed, another host").
DEMO_FLAGS ?=

.PHONY: demo test install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# Reinstall only when setup.py changed.
$(STAMP): setup.py | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/python -m experiments.instructgpt --config=configs/instructgpt.py:tiny --workdir=$(DEMO_DIR) $(DEMO_FLAGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -ra

clean:
	rm -rf $(VENV) runs .pytest_cache
