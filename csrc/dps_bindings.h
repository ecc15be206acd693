// What both Python modules (_cpu_kernels, _cuda_kernels) export besides
// their functions: the codes of dps_math.h's enums, as {name: value} dicts
// that tests/test_backends_contract.py compares with
// dps_fast.backends.contract.Mode, DType and StateFormat.
#pragma once
#include <stddef.h>

#include <pybind11/pybind11.h>

#include "dps_math.h"

namespace dps {

template <size_t N>
pybind11::dict named_codes(const NamedCode (&codes)[N]) {
  pybind11::dict out;
  for (const NamedCode& code : codes) out[code.name] = code.value;
  return out;
}

static inline void export_codes(pybind11::module_& m) {
  m.attr("modes") = named_codes(kModeNames);
  m.attr("dtypes") = named_codes(kDTypeNames);
  m.attr("state_formats") = named_codes(kStateFormatNames);
}

}  // namespace dps
