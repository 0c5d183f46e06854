// fastattn CPU forward attention (flash-attention style tiled online softmax), see forward.cpp.
#pragma once

#include "params.h"

namespace fastattn {
namespace FASTATTN_NS {

// Why p cannot describe a forward call, or nullptr when it can.
const char* forward_params_error(const Params& p);

// Throws std::invalid_argument (Python ValueError) with forward_params_error's reason, if any.
void check_forward_params(const Params& p);

// out[b,h,i,:] = sum_j softmax_j(scale <q_i,k_j> + mask_ij)[dropout] v_j ; lse[b,h,i] = log sum_j exp(s_ij).
// Uses p.num_threads threads (the caller included). Requires forward_params_error(p) == nullptr.
void forward(const Params& p);

}  // namespace FASTATTN_NS
}  // namespace fastattn
