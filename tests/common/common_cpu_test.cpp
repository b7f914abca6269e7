// The parts every family relies on: status strings, the thread-local last error, extensible
// config reading, workspace carving, and the host dtype rounding every comparison uses.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>

#include "capi/api.hpp"
#include "moekit/moekit.h"
#include "src/common/workspace.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"

TEST_CASE("status strings are never NULL and distinct", "[common]") {
  std::string seen;
  for (int s = MOEKIT_STATUS_SUCCESS; s <= MOEKIT_STATUS_INTERNAL_ERROR; ++s) {
    const char* text = moekit_status_string(static_cast<moekit_status_t>(s));
    REQUIRE(text != nullptr);
    REQUIRE(std::strlen(text) > 0);
    REQUIRE(seen.find(std::string("|") + text + "|") == std::string::npos);
    seen += std::string("|") + text + "|";
  }
  REQUIRE(std::string(moekit_status_string(static_cast<moekit_status_t>(-7))) ==
          "unknown moekit status");
}

TEST_CASE("version macros and the runtime query agree", "[common]") {
  REQUIRE(MOEKIT_VERSION == MOEKIT_VERSION_MAJOR * 10000 + MOEKIT_VERSION_MINOR * 100 + MOEKIT_VERSION_PATCH);
  REQUIRE(moekit_get_version() == MOEKIT_VERSION);
  REQUIRE(moekit_dtype_size(MOEKIT_DTYPE_F32) == 4);
  REQUIRE(moekit_dtype_size(MOEKIT_DTYPE_F16) == 2);
  REQUIRE(moekit_dtype_size(static_cast<moekit_dtype_t>(9)) == 0);
}

TEST_CASE("a failed call leaves a message on its own thread only", "[common]") {
  moekit_router_config_t config;
  REQUIRE(moekit_router_config_init(&config, sizeof(config)) == MOEKIT_STATUS_SUCCESS);
  config.num_experts = 32;
  config.top_k = 40;
  REQUIRE(moekit_router_config_check(&config) == MOEKIT_STATUS_INVALID_ARGUMENT);
  const std::string message = moekit_get_last_error();
  REQUIRE(message.find("moekit_router_config_check") != std::string::npos);
  REQUIRE(message.find("top_k = 40") != std::string::npos);

  std::string other_thread = "unset";
  std::thread([&] { other_thread = moekit_get_last_error(); }).join();
  REQUIRE(other_thread.empty());
  REQUIRE(std::string(moekit_get_last_error()) == message);

  // Copy-out: length query, truncation, NUL termination.
  REQUIRE(moekit_copy_last_error(nullptr, 0) == message.size());
  char small[6];
  std::memset(small, 'x', sizeof(small));
  REQUIRE(moekit_copy_last_error(small, sizeof(small)) == message.size());
  REQUIRE(std::string(small) == message.substr(0, 5));

  // A successful entry point clears it.
  config.top_k = 4;
  REQUIRE(moekit_router_config_check(&config) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(std::string(moekit_get_last_error()).empty());

  REQUIRE(moekit_router_config_check(nullptr) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(std::string(moekit_get_last_error()).find("config is NULL") != std::string::npos);
  moekit_clear_last_error();
  REQUIRE(std::string(moekit_get_last_error()).empty());
}

namespace {
struct ConfigV2 {  // a struct that grew a field after its first release
  size_t struct_size;
  int32_t a;
  int32_t added_later;
};
void defaults_v2(ConfigV2* c) {
  c->struct_size = sizeof(ConfigV2);
  c->a = 1;
  c->added_later = 42;
}
}  // namespace

TEST_CASE("an older caller's smaller config gets defaults for the newer fields", "[common]") {
  moekit::ApiScope scope("test_api");
  ConfigV2 old_caller{};
  old_caller.struct_size = offsetof(ConfigV2, added_later);
  old_caller.a = 7;
  old_caller.added_later = -1;  // beyond the caller's struct: must not be read
  ConfigV2 out{};
  REQUIRE(moekit::capi::read_config(&old_caller, "config", offsetof(ConfigV2, added_later),
                                    defaults_v2, &out) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(out.a == 7);
  REQUIRE(out.added_later == 42);
  REQUIRE(out.struct_size == sizeof(ConfigV2));

  old_caller.struct_size = 4;  // not filled by an init function
  REQUIRE(moekit::capi::read_config(&old_caller, "config", offsetof(ConfigV2, added_later),
                                    defaults_v2, &out) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(std::string(moekit::last_error()).find("test_api: config->struct_size = 4") == 0);
}

TEST_CASE("guarded turns exceptions into statuses", "[common]") {
  REQUIRE(moekit::capi::guarded("f", []() -> moekit_status_t { throw std::bad_alloc(); }) ==
          MOEKIT_STATUS_OUT_OF_MEMORY);
  REQUIRE(moekit::capi::guarded("f", []() -> moekit_status_t { throw std::runtime_error("x"); }) ==
          MOEKIT_STATUS_INTERNAL_ERROR);
  REQUIRE(std::string(moekit::last_error()) == "f: internal error: x");
}

TEST_CASE("workspace carving: count-only and real runs give the same layout", "[common]") {
  auto layout = [](moekit::WorkspaceCarver& ws) {
    float* a = ws.take<float>(3, "a");
    int32_t* b = ws.take<int32_t>(1000, "b");
    double* c = ws.take<double>(1, "c");
    return std::make_tuple(a, b, c);
  };
  moekit::WorkspaceCarver count(nullptr);
  auto none = layout(count);
  REQUIRE(std::get<0>(none) == nullptr);
  const size_t bytes = count.bytes();
  REQUIRE(bytes == 256 + 4096 + 256);

  alignas(256) static char buffer[8192];
  moekit::WorkspaceCarver real(buffer);
  auto [a, b, c] = layout(real);
  REQUIRE(reinterpret_cast<char*>(a) == buffer);
  REQUIRE(reinterpret_cast<char*>(b) == buffer + 256);
  REQUIRE(reinterpret_cast<char*>(c) == buffer + 256 + 4096);
  REQUIRE(real.bytes() == bytes);

  moekit::ApiScope scope("ws_api");
  REQUIRE(moekit::check_workspace(nullptr, 0, 0) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(moekit::check_workspace(buffer, bytes - 1, bytes) == MOEKIT_STATUS_WORKSPACE_TOO_SMALL);
  REQUIRE(moekit::check_workspace(nullptr, bytes, bytes) == MOEKIT_STATUS_INVALID_ARGUMENT);
  REQUIRE(moekit::check_workspace(buffer + 1, bytes, bytes) == MOEKIT_STATUS_MISALIGNED);
  REQUIRE(moekit::check_workspace(buffer, bytes, bytes) == MOEKIT_STATUS_SUCCESS);
}

TEST_CASE("host dtype rounding matches CUDA's round-to-nearest-even", "[common]") {
  auto rng = moekit::test::make_rng(0x5eed);
  std::vector<float> samples = moekit::test::normal(rng, 20000, 0.0f, 3.0f);
  auto more = moekit::test::uniform(rng, 20000, -70000.0f, 70000.0f);
  samples.insert(samples.end(), more.begin(), more.end());
  auto tiny = moekit::test::uniform(rng, 20000, -1e-4f, 1e-4f);  // half subnormals
  samples.insert(samples.end(), tiny.begin(), tiny.end());
  for (float special : {0.0f, -0.0f, 65504.0f, 65519.0f, 65520.0f, 1e-8f, 5.96e-8f,
                        std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()})
    samples.push_back(special);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 20000; ++i) {  // arbitrary bit patterns, NaN excluded
    uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isnan(f)) samples.push_back(f);
  }
  for (float x : samples) {
    const __half h = __float2half_rn(x);
    uint16_t hb;
    std::memcpy(&hb, &h, 2);
    const __nv_bfloat16 b = __float2bfloat16_rn(x);
    uint16_t bb;
    std::memcpy(&bb, &b, 2);
    INFO("x = " << x);
    REQUIRE(moekit::test::float_to_half_bits(x) == hb);
    REQUIRE(moekit::test::float_to_bf16_bits(x) == bb);
    REQUIRE(moekit::test::half_bits_to_float(hb) == __half2float(h));
    REQUIRE(moekit::test::bf16_bits_to_float(bb) == __bfloat162float(b));
  }
  REQUIRE(std::isnan(moekit::test::round_to(MOEKIT_DTYPE_BF16, std::nanf(""))));
  REQUIRE(std::isnan(moekit::test::round_to(MOEKIT_DTYPE_F16, std::nanf(""))));
}
