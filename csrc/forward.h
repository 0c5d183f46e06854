// fastattn CPU forward attention (flash-attention style tiled online softmax), see forward.cpp.
#pragma once

#include "common.h"

namespace fastattn {
namespace FASTATTN_NS {

// Throws std::invalid_argument (Python ValueError) when p cannot describe a forward call.
void check_forward_params(const Params& p);

// out[b,h,i,:] = sum_j softmax_j(scale <q_i,k_j> + mask_ij)[dropout] v_j ; lse[b,h,i] = log sum_j exp(s_ij).
// Uses p.num_threads threads (the caller included). Requires check_forward_params(p) to have passed.
void forward(const Params& p);

}  // namespace FASTATTN_NS
}  // namespace fastattn
