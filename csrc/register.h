// fastattn: the kernel families' pybind11 registrations; bindings.cpp calls them from PYBIND11_MODULE.
#pragma once

#include "isa.h"

namespace pybind11 {
class module_;
}

namespace fastattn {
namespace FASTATTN_NS {

void register_backward(pybind11::module_& m);  // backward.cpp: bwd
void register_additive(pybind11::module_& m);  // additive.cpp
void register_hard(pybind11::module_& m);      // hard.cpp
void register_eager(pybind11::module_& m);     // eager.cpp: eager_init, eager_fwd
void register_decode(pybind11::module_& m);    // decode.cpp: decode_fwd

}  // namespace FASTATTN_NS
}  // namespace fastattn
