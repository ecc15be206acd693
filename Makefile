# The two commands of the README: `make demo` and `make test`.
# torch==2.13.0 is installed first (a CPU wheel on this project's machines);
# the package itself only asks for a torch range that it satisfies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 numpy
	touch $@

$(VENV)/.installed: $(VENV)/.base pyproject.toml setup.py
	$(PIP) install -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m dps_fast demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
