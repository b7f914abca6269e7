// The EP handle behind moekit_ep_handle_t: the configuration, the caller's communicator (held as
// void*, so that this header needs no nccl.h), this rank, and the pipeline's stream and events.
// Created once per communicator by moekit_ep_create; every other call only reads it, except the
// pinned staging buffer of exact mode's one host read.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moekit/ep.h"
#include "src/ep/ep_config.hpp"

struct moekit_ep {
  static constexpr uint64_t kMagic = 0x6d6f656b69742d65ULL;  // "moekit-e"
  uint64_t magic = kMagic;
  moekit_ep_config_t config{};
  moekit::ep::Dims dims{};
  int32_t signature = 0;
  void* comm = nullptr;  // ncclComm_t
  int32_t rank = 0;
  int device = 0;
  int sm_count = 1;
  // Pipeline (num_chunks > 1): the second stream and the events that fork it from the caller's
  // stream and join it back; chunk[c] orders chunk c between the two streams.
  cudaStream_t side = nullptr;
  cudaEvent_t fork = nullptr;
  cudaEvent_t join = nullptr;
  cudaEvent_t chunk[MOEKIT_EP_MAX_CHUNKS] = {};
  // Exact mode: the counts arrive here, then the calling thread waits for counts_ready.
  cudaEvent_t counts_ready = nullptr;
  int32_t* host_staging = nullptr;  // pinned [2][n][kExchangeStride]
};
