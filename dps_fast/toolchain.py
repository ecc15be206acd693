"""Where the build finds CUDA's compiler: setup.py loads this file by its path
(the build has no torch, so it must not import the package), and the tests
import it to know whether the CUDA module was to be built. No imports from
dps_fast here."""
import os
import shutil


def find_nvcc():
    """nvcc's path: $CUDACXX, the PATH, then bin/ of $CUDA_HOME, $CUDA_PATH and
    /usr/local/cuda; None if none holds an executable nvcc."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)
