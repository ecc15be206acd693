"""Build script: the package is pure Python; the compiled kernels are optional.

build_ext runs CMake (CMakeLists.txt) to build
  dps_fast._cpu_kernels   always (C++ and OpenMP), and
  dps_fast._cuda_kernels  when CUDA's nvcc is found (static cudart, no torch headers).
A missing toolchain (cmake, a C++ compiler, nvcc) or a failed kernel build
prints one warning line and leaves the pure-PyTorch backend; it never fails
the install, except that DPS_FAST_CUDA=1 makes a missing CUDA module an error.

Environment:
  DPS_FAST_CUDA        auto (default: build the CUDA module if nvcc is found) | 0 | 1
  DPS_FAST_CUDA_ARCHS  CUDA architectures, default "80;90" (never "native")
  DPS_FAST_BUILD_JOBS  parallel compile jobs (default: all cores)
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CPU_MODULE = "dps_fast._cpu_kernels"
CUDA_MODULE = "dps_fast._cuda_kernels"


def warn(message):
    print(f"WARNING: dps_fast: {message}", file=sys.stderr, flush=True)


def find_cmake():
    found = shutil.which("cmake")
    if found:
        return found
    try:  # the PyPI `cmake` package, when installed
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return None


def _load_toolchain():
    """dps_fast/toolchain.py (find_nvcc), loaded by path: importing dps_fast would import torch."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dps_fast", "toolchain.py")
    spec = importlib.util.spec_from_file_location("_dps_fast_toolchain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


find_nvcc = _load_toolchain().find_nvcc


def cuda_request():
    value = os.environ.get("DPS_FAST_CUDA", "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"DPS_FAST_CUDA must be auto, 0 or 1; got {value!r}")
    return value


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt once, then place each module where
    build_ext expects it (setuptools copies it into the source tree for -e)."""

    def build_extensions(self):
        built = self._build_with_cmake()
        for ext in self.extensions:
            source = built.get(ext.name)
            if source:
                target = self.get_ext_fullpath(ext.name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                # a new file, renamed over the old one: a process that has the old
                # module loaded keeps its (unlinked) copy instead of crashing
                shutil.copyfile(source, target + ".tmp")
                os.replace(target + ".tmp", target)

    def _build_with_cmake(self):
        """{module name: built file}; warns about each module it could not build."""
        request = cuda_request()
        cmake = find_cmake()
        if cmake is None:
            return self._give_up(request, "cmake not found")
        nvcc = find_nvcc() if request != "0" else None
        if request == "1" and nvcc is None:
            raise SystemExit("DPS_FAST_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        log_path = os.path.join(build_dir, "build.log")
        os.makedirs(build_dir, exist_ok=True)
        open(log_path, "w").close()

        with_cuda = nvcc is not None and self._configure(cmake, build_dir, nvcc, log_path)
        if nvcc is not None and not with_cuda:
            if request == "1":
                self._fail(f"DPS_FAST_CUDA=1 but CMake could not set up CUDA with {nvcc}", log_path)
            warn(f"CUDA module not built (CMake could not set up CUDA with {nvcc}{self._first_error(log_path)})")
        if not with_cuda and not self._configure(cmake, build_dir, None, log_path):
            return self._give_up(request, f"no working C++ toolchain with pybind11{self._first_error(log_path)}")

        built = {}
        out_dir = os.path.join(build_dir, "out")
        modules = [(CPU_MODULE, "_cpu_kernels")] + ([(CUDA_MODULE, "_cuda_kernels")] if with_cuda else [])
        for module, target in modules:
            if self._run([cmake, "--build", build_dir, "--target", target, "--parallel", str(self._jobs())],
                         log_path):
                built[module] = os.path.join(out_dir, target + sysconfig.get_config_var("EXT_SUFFIX"))
            elif module == CUDA_MODULE and request == "1":
                self._fail("DPS_FAST_CUDA=1 but the CUDA module failed to build", log_path)
            else:
                warn(f"{module} failed to build{self._first_error(log_path)}; "
                     + ("the CUDA backend is unavailable" if module == CUDA_MODULE
                        else "CPU tensors use the pure-PyTorch backend"))
        if request == "auto" and nvcc is None:
            warn("CUDA module not built (nvcc not found; set CUDA_HOME, or DPS_FAST_CUDA=0 to silence this)")
        return built

    def _configure(self, cmake, build_dir, nvcc, log_path):
        try:
            import pybind11
        except ImportError:
            with open(log_path, "a") as log:
                log.write("pybind11 is not installed (pip install pybind11, or build with build isolation)\n")
            return False
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if os.path.exists(cache):  # a previous configure may have had other options
            os.remove(cache)
        args = [cmake, "-S", os.path.dirname(os.path.abspath(__file__)), "-B", build_dir,
                f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                "-DCMAKE_BUILD_TYPE=Release", f"-DDPS_FAST_OUTPUT_DIR={os.path.join(build_dir, 'out')}",
                f"-DDPS_FAST_CUDA={'ON' if nvcc else 'OFF'}"]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DDPS_FAST_CUDA_ARCHS={os.environ.get('DPS_FAST_CUDA_ARCHS', '80;90')}"]
        return self._run(args, log_path)

    @staticmethod
    def _run(args, log_path):
        with open(log_path, "a") as log:
            log.write("$ " + " ".join(args) + "\n")
            log.flush()
            try:
                return subprocess.run(args, stdout=log, stderr=subprocess.STDOUT).returncode == 0
            except OSError as error:
                log.write(f"{error}\n")
                return False

    @staticmethod
    def _fail(message, log_path):
        with open(log_path) as log:
            sys.stderr.write("".join(log.readlines()[-60:]))
        raise SystemExit(message)

    @staticmethod
    def _first_error(log_path):
        """The log's first line that names an error, for a one-line warning."""
        try:
            with open(log_path) as log:
                lines = [line.strip() for line in log if line.strip()]
            for i, line in enumerate(lines):
                if "error" in line.lower() and not line.startswith("$ "):
                    if line.endswith(":") and i + 1 < len(lines):  # CMake puts the message on the next line
                        line += " " + lines[i + 1]
                    return ": " + line[:300]
        except OSError:
            pass
        return ""

    @staticmethod
    def _jobs():
        return int(os.environ.get("DPS_FAST_BUILD_JOBS", 0)) or os.cpu_count() or 1

    @staticmethod
    def _give_up(request, reason):
        if request == "1":
            raise SystemExit(f"DPS_FAST_CUDA=1 but {reason}")
        warn(f"compiled kernels not built ({reason}); the pure-PyTorch backend will be used")
        return {}


setup(
    ext_modules=[Extension(CPU_MODULE, sources=[], optional=True),
                 Extension(CUDA_MODULE, sources=[], optional=True)],
    cmdclass={"build_ext": CMakeBuild},
)
