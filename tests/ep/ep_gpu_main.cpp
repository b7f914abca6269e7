// Main of the multi-GPU EP suite (Catch2 2 or 3). Exits 77 (SKIP in `meson test`) when fewer than
// two CUDA devices are usable or moekit was built without NCCL, so single-GPU machines and CI show
// the suite as skipped, never as passed. Sets NCCL_NVLS_ENABLE=0 before any communicator exists.
#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include "moekit/ep.h"
#include "tests/support/random.hpp"
#if MOEKIT_EP_TEST_HAVE_NCCL
#include "tests/ep/multi_gpu.hpp"
#endif

int main(int argc, char** argv) {
#if !MOEKIT_EP_TEST_HAVE_NCCL
  (void)argc;
  (void)argv;
  std::printf("SKIP: moekit was built without NCCL; multi-GPU EP tests not run\n");
  return 77;
#else
  moekit::test::ep::keep_nvls_off();
  int32_t version = 0;
  if (moekit_ep_nccl_version(&version) != MOEKIT_STATUS_SUCCESS) {
    std::printf("SKIP: %s\n", moekit_get_last_error());
    return 77;
  }
  const int devices = moekit::test::ep::device_count();
  if (devices < 2) {
    std::printf("SKIP: %d usable CUDA device(s); the multi-GPU EP tests need at least 2\n", devices);
    return 77;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("GPUs: %d x %s (sm_%d%d, %d SMs); NCCL %d; NCCL_NVLS_ENABLE=%s\n", devices,
              prop.name, prop.major, prop.minor, prop.multiProcessorCount, version,
              std::getenv("NCCL_NVLS_ENABLE"));
  std::printf("random seed for fresh inputs: %llu (set MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(moekit::test::session_seed()));
  std::fflush(stdout);  // the watchdog may end the process with _Exit, which flushes nothing
  // Declaration order unless --order is given: the smoke steps come first, so that a hang is met
  // at the smallest step that shows it (some Catch2 3 releases default to random order).
  Catch::Session session;
  const int parse = session.applyCommandLine(argc, argv);
  if (parse != 0) return parse;
  bool order_given = false;
  for (int i = 1; i < argc; ++i)
    order_given = order_given || std::strncmp(argv[i], "--order", 7) == 0;
#if __has_include(<catch2/catch_all.hpp>)
  if (!order_given) session.configData().runOrder = Catch::TestRunOrder::Declared;
#else
  if (!order_given) session.configData().runOrder = Catch::RunTests::InDeclarationOrder;
#endif
  const int result = session.run();
  moekit::test::ep::destroy_communicators();
  return result;
#endif
}
