// An empty kernel, for the benchmarks' launch floor: what one kernel costs the device when nothing
// else is in the way (no work, no arguments), timed exactly like the call it is set beside. A
// floor below it (bytes over bandwidth smaller than one launch) cannot be reached by any kernel.
#include <cuda_runtime.h>

#include "bench/common/bench_util.hpp"

namespace moekit::bench {
namespace {
__global__ void empty_kernel() {}
}  // namespace

void launch_empty_kernel(cudaStream_t stream) {
  empty_kernel<<<1, 32, 0, stream>>>();
  BENCH_CUDA(cudaGetLastError());
}

}  // namespace moekit::bench
