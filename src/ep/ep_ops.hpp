// The EP operations behind the C API (src/ep/ep_ops.cpp). Arguments were validated by capi/ep;
// these functions enqueue work and talk to NCCL. Built without NCCL, every one of them returns
// MOEKIT_STATUS_NOT_AVAILABLE.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "moekit/ep.h"
#include "src/ep/ep_handle.hpp"

namespace moekit::ep {

// True when this library was built with NCCL.
bool built_with_nccl();
moekit_status_t nccl_version(int32_t* version);

moekit_status_t create(const moekit_ep_config_t& config, void* comm, moekit_ep** out);
void destroy(moekit_ep* handle);

// INVALID_ARGUMENT unless the calling thread's current device is the communicator's.
moekit_status_t check_device(const moekit_ep& h);
// INVALID_ARGUMENT unless comm's size is known (reports NCCL errors); n is its size.
moekit_status_t comm_size(void* comm, int32_t* n);

moekit_status_t layout(moekit_ep& h, int64_t num_tokens, const int32_t* indices,
                       const uint8_t* token_mask, void* layout, int64_t* host_layout,
                       int64_t* num_recv_rows, int32_t* dropped, cudaStream_t stream);

moekit_status_t dispatch(moekit_ep& h, int64_t num_tokens, const void* layout,
                         const int64_t* host_layout, const void* x, const int32_t* indices,
                         const float* weights, void* recv_x, int32_t* recv_indices,
                         float* recv_weights, int32_t* recv_src_token, uint8_t* recv_mask,
                         void* workspace, cudaStream_t stream);

moekit_status_t combine(moekit_ep& h, int64_t num_tokens, const void* layout,
                        const int64_t* host_layout, const void* partials, void* y, void* workspace,
                        cudaStream_t stream);

moekit_status_t dispatch_backward(moekit_ep& h, int64_t num_tokens, const void* layout,
                                  const int64_t* host_layout, const int32_t* indices,
                                  const void* grad_recv_x, const float* grad_recv_weights,
                                  void* grad_x, float* grad_weights, void* workspace,
                                  cudaStream_t stream);

moekit_status_t combine_backward(moekit_ep& h, int64_t num_tokens, const void* layout,
                                 const int64_t* host_layout, const void* grad_y,
                                 void* grad_partials, void* workspace, cudaStream_t stream);

moekit_status_t allreduce_expert_load(void* comm, int32_t num_experts, int32_t* expert_load,
                                      cudaStream_t stream);
moekit_status_t allreduce_aux_stats(void* comm, int32_t num_ranks, int32_t num_experts,
                                    float* aux_score_sum, int32_t* aux_token_count,
                                    void* workspace, cudaStream_t stream);

}  // namespace moekit::ep
