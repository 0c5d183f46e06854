// fastattn CPU additive attention kernels (issue 5): placeholder until the kernels land.
#include <pybind11/pybind11.h>

#include "common.h"

namespace fastattn {
namespace FASTATTN_NS {

void register_additive(pybind11::module_& m) { (void)m; }

}  // namespace FASTATTN_NS
}  // namespace fastattn
