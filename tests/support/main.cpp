// Test main for both Catch2 majors. Built twice: MOEKIT_TEST_NEEDS_GPU=1 for the GPU suites,
// which exit with 77 (SKIP in `meson test`) when no CUDA device is usable, so a machine without
// a GPU shows them as skipped, never as passed.
#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <cstdio>
#include <cstdlib>

#include "tests/support/random.hpp"

#if MOEKIT_TEST_NEEDS_GPU
#include <cuda_runtime.h>
#endif

int main(int argc, char** argv) {
#if MOEKIT_TEST_NEEDS_GPU
  int devices = 0;
  const cudaError_t error = cudaGetDeviceCount(&devices);
  if (error != cudaSuccess || devices == 0) {
    std::printf("SKIP: no usable CUDA device (%s); GPU tests not run\n",
                error != cudaSuccess ? cudaGetErrorString(error) : "0 devices");
    return 77;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("GPU: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount);
#endif
  std::printf("random seed for fresh inputs: %llu (set MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(moekit::test::session_seed()));
  return Catch::Session().run(argc, argv);
}
