"""Every backend module implements dps_fast.backends.contract: its functions,
with the Protocol's signatures, and no other public function; the compiled
modules' codes are contract.Mode's and contract.DType's (csrc/dps_math.h
defines them for C++, and the modules export them from there)."""
import importlib
import inspect

import pytest

from dps_fast import backends
from dps_fast.backends import contract

MODULES = {"torch": "reference", "cpu": "cpu", "cuda": "cuda", "triton": "triton_backend"}
# Public helpers a backend may have besides the contract's functions.
# the spec's AdamW step, which the kernels' comments cite; the fast backends' fallback; the
# rounding of the masked norms, which every backend applies to its float64 sums
HELPERS = {"torch": {"adamw_math", "update_some", "norms_from_squares"}}


def _backend(name):
    try:
        return importlib.import_module(f"dps_fast.backends.{MODULES[name]}")
    except ImportError as error:  # triton not installed, or too old
        pytest.skip(f"dps_fast.backends.{MODULES[name]} does not import here ({error})")


def _without_annotations(signature, drop_self=False):
    """`signature` as names, kinds and defaults only (the backends' functions are not annotated)."""
    parameters = list(signature.parameters.values())[1 if drop_self else 0:]
    return inspect.Signature([p.replace(annotation=inspect.Parameter.empty) for p in parameters])


def test_the_protocol_has_the_contract_functions():
    methods = {name for name, value in vars(contract.Backend).items()
               if inspect.isfunction(value) and not name.startswith("_")}
    assert methods == set(contract.FUNCTIONS)
    assert set(MODULES) == set(backends.BACKEND_NAMES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_backend_implements_the_contract(name):
    module = _backend(name)
    assert module.NAME == name
    public = {attr for attr, value in vars(module).items() if inspect.isfunction(value) and not attr.startswith("_")}
    assert public == set(contract.FUNCTIONS) | HELPERS.get(name, set())
    for function in contract.FUNCTIONS:
        want = _without_annotations(inspect.signature(getattr(contract.Backend, function)), drop_self=True)
        assert _without_annotations(inspect.signature(getattr(module, function))) == want, f"{name}.{function}"


@pytest.mark.parametrize("module_name", ["dps_fast._cpu_kernels", "dps_fast._cuda_kernels"])
def test_compiled_module_codes_are_the_contracts(module_name):
    """The modes, dtypes and state formats a compiled module exports (from dps_math.h's enums) are the
    codes the Python side passes. The CUDA module imports without a GPU."""
    module = pytest.importorskip(module_name)  # tests/test_build.py says whether it should be built
    assert module.modes == {mode.name: mode.value for mode in contract.Mode}
    assert module.dtypes == {dtype.name: dtype.value for dtype in contract.DType}
    assert module.state_formats == {code.name: code.value for code in contract.StateFormat}
