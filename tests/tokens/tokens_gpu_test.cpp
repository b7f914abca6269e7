// Tokens family on the GPU: the device plan against the reference and against its definition
// (exact integers) on the awkward grid and at benchmark sizes; permute / combine / both backwards
// for f32, bf16 and f16 on the vector and scalar paths (bitwise against an fp32 emulation of the
// documented arithmetic, and within the dtype tolerance of the double reference); round trip;
// bitwise determinism; CUDA graph capture; T = 0; bad arguments leave poisoned outputs untouched;
// rows past the total stay poisoned; a corrupt plan never makes a kernel write out of bounds.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "moekit/moekit.h"
#include "tests/reference/tokens_ref.hpp"
#include "tests/support/catch.hpp"
#include "tests/support/device.hpp"
#include "tests/support/numeric.hpp"
#include "tests/support/random.hpp"
#include "tests/tokens/routing.hpp"

using moekit::test::DeviceBuffer;
using moekit::test::make_indices;
using moekit::test::make_mask;
using moekit::test::make_weights;
using moekit::test::plan_config;
using moekit::test::Routing;

namespace {

// Plan arrays are poisoned with this byte: 0x7b7b7b7b is neither -1 (the sentinel) nor a row.
constexpr int kPlanPoisonByte = 0x7b;
constexpr int32_t kPlanPoison = 0x7b7b7b7b;

// A blocking stream: it orders itself after the legacy-stream memsets and copies the test uses to
// poison and upload buffers.
struct Stream {
  cudaStream_t s = nullptr;
  Stream() { cudaStreamCreate(&s); }
  ~Stream() { cudaStreamDestroy(s); }
};

void fill(DeviceBuffer& b, int byte) {
  if (b.bytes() > 0) CUDA_REQUIRE(cudaMemset(b.get(), byte, b.bytes()));
}

bool all_bytes(const DeviceBuffer& b, int byte) {
  for (uint8_t v : b.to_host<uint8_t>())
    if (v != byte) return false;
  return true;
}

// The inputs of one plan, on the host and on the device.
struct Routed {
  moekit_plan_config_t config;
  int64_t tokens = 0;
  std::vector<int32_t> indices;
  std::vector<float> weights;
  std::vector<uint8_t> mask;
  DeviceBuffer d_indices, d_weights, d_mask;

  Routed(std::mt19937_64& rng, const moekit::test::PlanCase& pc, bool specials = true)
      : config(pc.config), tokens(pc.tokens) {
    indices = make_indices(rng, pc.tokens, pc.config.top_k, pc.config.num_experts, pc.routing,
                           pc.invalid_fraction);
    weights = make_weights(rng, indices.size(), specials);
    if (pc.real_fraction < 1.0) mask = make_mask(rng, pc.tokens, pc.real_fraction);
    d_indices = DeviceBuffer::from(indices);
    d_weights = DeviceBuffer::from(weights);
    if (!mask.empty()) d_mask = DeviceBuffer::from(mask);
  }
  const uint8_t* mask_ptr() const { return mask.empty() ? nullptr : d_mask.get<uint8_t>(); }
  moekit::ref::TokenPlan reference() const {
    return moekit::ref::build_plan(moekit::ref::resolve(config), tokens, indices, weights, mask);
  }
};

// The plan arrays on the device, poisoned.
struct DevicePlan {
  moekit_plan_config_t config;
  int64_t tokens;
  int64_t max_rows = 0;
  int num_local = 0;
  DeviceBuffer counts, offsets, row_of_slot, slot_of_row, totals, workspace;
  moekit_token_plan_t plan;

  DevicePlan(const moekit_plan_config_t& c, int64_t t) : config(c), tokens(t) {
    num_local = moekit::ref::resolve(c).num_local;
    REQUIRE(moekit_plan_max_rows(&c, t, &max_rows) == MOEKIT_STATUS_SUCCESS);
    size_t ws = 0;
    REQUIRE(moekit_plan_workspace_size(&c, t, &ws) == MOEKIT_STATUS_SUCCESS);
    counts = DeviceBuffer(sizeof(int32_t) * num_local);
    offsets = DeviceBuffer(sizeof(int32_t) * (num_local + 1));
    row_of_slot = DeviceBuffer(sizeof(int32_t) * t * c.top_k);
    slot_of_row = DeviceBuffer(sizeof(int32_t) * max_rows);
    totals = DeviceBuffer(sizeof(int32_t) * MOEKIT_PLAN_NUM_TOTALS);
    workspace = DeviceBuffer(ws);
    moekit_token_plan_init(&plan, sizeof(plan));
    plan.expert_counts = counts.get<int32_t>();
    plan.expert_offsets = offsets.get<int32_t>();
    plan.row_of_slot = row_of_slot.get<int32_t>();
    plan.slot_of_row = slot_of_row.get<int32_t>();
    plan.totals = totals.get<int32_t>();
    poison();
  }
  void poison() {
    for (DeviceBuffer* b : {&counts, &offsets, &row_of_slot, &slot_of_row, &totals}) fill(*b, kPlanPoisonByte);
    fill(workspace, 0xa5);  // the workspace need not start zeroed
  }
  bool untouched() const {
    for (const DeviceBuffer* b : {&counts, &offsets, &row_of_slot, &slot_of_row, &totals})
      if (!all_bytes(*b, kPlanPoisonByte)) return false;
    return true;
  }
  moekit_status_t build(const Routed& r, cudaStream_t s) {
    return moekit_plan_build(&config, tokens, r.d_indices.get<int32_t>(), r.d_weights.get<float>(),
                             r.mask_ptr(), &plan, workspace.get(), workspace.bytes(), s);
  }
  // Downloads the plan; slot_of_row is cut at the total after checking the rest is untouched.
  moekit::ref::TokenPlan download() const {
    moekit::ref::TokenPlan p;
    p.expert_counts = counts.to_host<int32_t>();
    p.expert_offsets = offsets.to_host<int32_t>();
    p.row_of_slot = row_of_slot.to_host<int32_t>();
    const auto t = totals.to_host<int32_t>();
    p.total = t[0];
    p.dropped = t[1];
    p.invalid = t[2];
    auto slots = slot_of_row.to_host<int32_t>();
    REQUIRE(p.total >= 0);
    REQUIRE(p.total <= max_rows);
    for (int64_t r = p.total; r < max_rows; ++r) {
      INFO("slot_of_row[" << r << "] past total " << p.total);
      REQUIRE(slots[r] == kPlanPoison);
    }
    slots.resize(p.total);
    p.slot_of_row = slots;
    return p;
  }
};

template <class T>
void require_same(const std::vector<T>& want, const std::vector<T>& got, const char* what) {
  REQUIRE(want.size() == got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] != got[i]) {
      INFO(what << "[" << i << "]: reference " << want[i] << ", device " << got[i]);
      REQUIRE(want[i] == got[i]);
    }
  }
}

void require_plan_equal(const moekit::ref::TokenPlan& want, const moekit::ref::TokenPlan& got) {
  REQUIRE(want.total == got.total);
  REQUIRE(want.dropped == got.dropped);
  REQUIRE(want.invalid == got.invalid);
  require_same(want.expert_counts, got.expert_counts, "expert_counts");
  require_same(want.expert_offsets, got.expert_offsets, "expert_offsets");
  require_same(want.row_of_slot, got.row_of_slot, "row_of_slot");
  require_same(want.slot_of_row, got.slot_of_row, "slot_of_row");
}

// Builds, checks against the reference and the definition, builds again and requires the same
// bits (the workspace is re-poisoned in between).
void check_plan_case(std::mt19937_64& rng, const moekit::test::PlanCase& pc) {
  INFO(moekit::test::describe(pc.config, pc.tokens));
  Stream stream;
  Routed r(rng, pc);
  DevicePlan d(pc.config, pc.tokens);
  MOEKIT_REQUIRE_OK(d.build(r, stream.s));
  CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
  const auto got = d.download();
  const auto c = moekit::ref::resolve(pc.config);
  REQUIRE(moekit::ref::check_plan(c, pc.tokens, r.indices, r.weights, r.mask, got) == "");
  require_plan_equal(r.reference(), got);

  d.poison();
  MOEKIT_REQUIRE_OK(d.build(r, stream.s));
  CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
  const auto again = d.download();
  require_plan_equal(got, again);
}

// Sets MOEKIT_PLAN_KERNELS (src/tokens/plan.hpp) for its lifetime, then restores it.
struct PlanKernelsEnv {
  std::string saved;
  bool had = false;
  explicit PlanKernelsEnv(const char* value) {
    if (const char* v = std::getenv("MOEKIT_PLAN_KERNELS")) {
      had = true;
      saved = v;
    }
    setenv("MOEKIT_PLAN_KERNELS", value, 1);
  }
  ~PlanKernelsEnv() {
    if (had)
      setenv("MOEKIT_PLAN_KERNELS", saved.c_str(), 1);
    else
      unsetenv("MOEKIT_PLAN_KERNELS");
  }
};

// Builds the plan of `r` with the given kernels (directly, then replayed from a captured graph),
// checks it against the reference and its definition, and returns it.
moekit::ref::TokenPlan plan_with_kernels(const Routed& r, const char* kernels) {
  INFO("MOEKIT_PLAN_KERNELS=" << kernels);
  PlanKernelsEnv env(kernels);
  Stream stream;
  DevicePlan d(r.config, r.tokens);
  MOEKIT_REQUIRE_OK(d.build(r, stream.s));
  CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
  const auto got = d.download();
  REQUIRE(moekit::ref::check_plan(moekit::ref::resolve(r.config), r.tokens, r.indices, r.weights, r.mask, got) == "");
  require_plan_equal(r.reference(), got);

  d.poison();
  cudaGraph_t graph = nullptr;
  CUDA_REQUIRE(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
  const moekit_status_t status = d.build(r, stream.s);
  const cudaError_t end = cudaStreamEndCapture(stream.s, &graph);
  INFO(moekit_get_last_error());
  REQUIRE(status == MOEKIT_STATUS_SUCCESS);
  CUDA_REQUIRE(end);
  REQUIRE(d.untouched());
  cudaGraphExec_t exec = nullptr;
  CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
  CUDA_REQUIRE(cudaGraphLaunch(exec, stream.s));
  CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
  require_plan_equal(got, d.download());
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return got;
}

}  // namespace

TEST_CASE("the one-block, one-launch (cooperative) and two-launch plan kernels agree with the reference",
          "[gpu][tokens][plan][kernels]") {
  // Grid sizes of plan_grid (kernels/tokens/tuning.hpp, 1024-slot tiles): one block up to
  // N = 1024 (T = 0 included), where "auto" takes the plain one-block kernel and "fused" still the
  // cooperative one; 2 blocks from 1025; 128 blocks of one tile (the widest grid; on a GPU with
  // fewer SMs "auto" takes two launches); more tiles than 128 (several per block); E_local = 2048
  // and 4096 (the table caps the grid at 17 and 8 blocks, here of several tiles; more than 48 KiB
  // of shared memory); K = 32; capacities that drop by position and by weight (the select kernel
  // after every path); alignment 128; T = 0.
  auto rng = moekit::test::make_rng(0x91a2);
  const int pos = MOEKIT_DROP_BY_POSITION, wt = MOEKIT_DROP_BY_WEIGHT;
  std::vector<moekit::test::PlanCase> cases = moekit::test::plan_case_grid();
  const std::vector<moekit::test::PlanCase> more = {
      {0, plan_config(256, 8), Routing::kDistinct, 0, 1},              // T = 0: 1 block, no slot
      {128, plan_config(256, 8), Routing::kDistinct, 0, 1},            // N = 1024: 1 block
      {129, plan_config(256, 8), Routing::kDistinct, 0, 1},            // N = 1032: 2 blocks
      {256, plan_config(256, 8), Routing::kDistinct, 0, 1},            // N = 2048: 2 blocks
      {100, plan_config(256, 8, 16, 3, wt), Routing::kSkewed, 0, 1},   // 1 block, then select
      {90, plan_config(64, 8, 4, 0, pos), Routing::kAny, 0.05, 0.8},  // 1 block, mask, invalid ids
      {32, plan_config(2048, 32), Routing::kDistinct, 0, 1},           // N = 1024, E = 2048, K = 32
      {1, plan_config(4096, 8, 128), Routing::kAny, 0.01, 1},          // 1 block, E_local = 4096
      {2000, plan_config(2048, 32, 8), Routing::kSkewed, 0, 0.9},      // 17 blocks of several tiles
      {3000, plan_config(4096, 8, 128), Routing::kAny, 0.01, 1},       // E_local = 4096, A = 128
      {16384, plan_config(8, 8), Routing::kDistinct, 0, 1},            // 128 blocks of one tile
      {30000, plan_config(64, 8, 16), Routing::kAny, 0.001, 0.9},      // 235 tiles on 118 blocks
      {16384, plan_config(256, 8), Routing::kDistinct, 0, 1},          // the bar's shape: 128 blocks
      {4096, plan_config(256, 8), Routing::kDistinct, 0, 1},           // deepseek: 32 blocks
      {8192, plan_config(8, 2), Routing::kDistinct, 0, 1},             // mixtral: 16 blocks
      {16384, plan_config(256, 8, 128, 400, pos), Routing::kSkewed, 0, 1},
      {16384, plan_config(256, 8, 8, 400, wt), Routing::kSkewed, 0, 1},
      {3000, plan_config(2048, 32, 1, 20, wt), Routing::kSkewed, 0, 1},
      // The table's entry width: 8 blocks of 63 tiles (64512 slots, 16-bit entries) and of 64
      // tiles (65536 slots, int32 entries), every slot to one expert, so that one count of a
      // block is 64512 (fits 16 bits) and 65536 (does not).
      {516096, plan_config(4096, 1), Routing::kOneHot, 0, 1},
      {524288, plan_config(4096, 1), Routing::kOneHot, 0, 1},
  };
  cases.insert(cases.end(), more.begin(), more.end());
  for (const auto& pc : cases) {
    INFO(moekit::test::describe(pc.config, pc.tokens));
    Routed r(rng, pc);
    const auto automatic = plan_with_kernels(r, "auto");  // the one-block kernel when N <= 1024
    const auto fused = plan_with_kernels(r, "fused");
    const auto split = plan_with_kernels(r, "split");
    require_plan_equal(automatic, fused);
    require_plan_equal(fused, split);
  }
}

TEST_CASE("device plan equals the reference on the awkward grid", "[gpu][tokens][plan]") {
  auto rng = moekit::test::make_rng(0x91a0);
  for (const auto& pc : moekit::test::plan_case_grid()) check_plan_case(rng, pc);
}

TEST_CASE("device plan at benchmark sizes, many tiles per block and large E_local",
          "[gpu][tokens][plan][large]") {
  auto rng = moekit::test::make_rng(0x91a1);
  const int pos = MOEKIT_DROP_BY_POSITION, wt = MOEKIT_DROP_BY_WEIGHT;
  const std::vector<moekit::test::PlanCase> cases = {
      {16384, plan_config(256, 8), Routing::kDistinct, 0, 1},           // the plan bar's shape
      {16384, plan_config(256, 8, 128), Routing::kSkewed, 0, 0.95},
      {4096, plan_config(256, 8, 16), Routing::kDistinct, 0, 1},
      {16384, plan_config(128, 8), Routing::kDistinct, 0, 1},
      {8192, plan_config(8, 2), Routing::kDistinct, 0, 1},
      {70000, plan_config(64, 8, 8), Routing::kAny, 0.001, 0.9},         // several tiles per block
      {20000, plan_config(4096, 8, 1), Routing::kDistinct, 0, 1},        // 7 blocks, 12 tiles each
      {20000, plan_config(6000, 8, 8, 0, pos, 1904, 4096), Routing::kDistinct, 0.01, 1},
      {16384, plan_config(256, 8, 1, 400, pos), Routing::kSkewed, 0, 1},
      {16384, plan_config(256, 8, 8, 400, wt), Routing::kSkewed, 0, 1},
      {40000, plan_config(16, 4, 1, 3000, wt), Routing::kDistinct, 0, 1},   // lists of ~10000
      {50000, plan_config(2, 1, 1, 1, wt), Routing::kOneHot, 0, 1},          // keep 1 of 50000
      // E_local < 256 with more table rows than one batch of a column's threads covers (the
      // scatter's column sums take several predicated batches): 79 blocks, 1 or 2 threads a column
      {40000, plan_config(200, 8, 8), Routing::kSkewed, 0, 1},
      {40000, plan_config(128, 8), Routing::kDistinct, 0, 0.9},
  };
  for (const auto& pc : cases) check_plan_case(rng, pc);
}

TEST_CASE("T = 0 writes the T-independent outputs and nothing else", "[gpu][tokens]") {
  Stream stream;
  for (int A : {1, 8}) {
    const auto cfg = plan_config(37, 4, A);
    DevicePlan d(cfg, 0);
    MOEKIT_REQUIRE_OK(moekit_plan_build(&cfg, 0, nullptr, nullptr, nullptr, &d.plan, d.workspace.get(),
                                        d.workspace.bytes(), stream.s));
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    for (int32_t v : d.counts.to_host<int32_t>()) REQUIRE(v == 0);
    for (int32_t v : d.offsets.to_host<int32_t>()) REQUIRE(v == 0);
    for (int32_t v : d.totals.to_host<int32_t>()) REQUIRE(v == 0);
    // Movement with T = 0: nothing to read or write, NULL data is fine.
    DeviceBuffer y(64);
    fill(y, 0xff);
    MOEKIT_REQUIRE_OK(moekit_tokens_permute(&cfg, &d.plan, 0, 8, MOEKIT_DTYPE_BF16, nullptr, 8, nullptr,
                                            nullptr, nullptr, stream.s));
    MOEKIT_REQUIRE_OK(moekit_tokens_combine(&cfg, &d.plan, 0, 8, MOEKIT_DTYPE_BF16, nullptr, nullptr,
                                            y.get(), 8, stream.s));
    MOEKIT_REQUIRE_OK(moekit_tokens_permute_backward(&cfg, &d.plan, 0, 8, MOEKIT_DTYPE_F16, nullptr,
                                                     nullptr, nullptr, 8, nullptr, stream.s));
    MOEKIT_REQUIRE_OK(moekit_tokens_combine_backward(&cfg, &d.plan, 0, 8, MOEKIT_DTYPE_F32, nullptr, 8,
                                                     nullptr, nullptr, y.get(), nullptr, stream.s));
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    REQUIRE(all_bytes(y, 0xff));
  }
}

namespace {

// Host tensors of one dtype: values already representable, and their bytes.
struct HostTensor {
  moekit_dtype_t dtype;
  std::vector<float> values;  // logical [rows, H] (strides applied only on the device copy)
};

std::vector<float> random_values(std::mt19937_64& rng, moekit_dtype_t dtype, size_t n) {
  return moekit::test::rounded(dtype, moekit::test::normal(rng, n, 0.0f, 1.0f));
}

// Uploads rows [n, H] into a device buffer with a row stride and a leading offset (elements); the
// gaps hold `gap_byte`.
DeviceBuffer upload_strided(moekit_dtype_t dtype, const std::vector<float>& v, int64_t rows,
                            int64_t H, int64_t stride, int64_t offset, int gap_byte = 0x5c) {
  const size_t es = moekit::test::dtype_bytes(dtype);
  std::vector<uint8_t> bytes((offset + std::max<int64_t>(rows, 1) * stride) * es, gap_byte);
  const auto packed = moekit::test::pack(dtype, v);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(&bytes[(offset + r * stride) * es], &packed[r * H * es], H * es);
  return DeviceBuffer::from(bytes);
}

// Reads rows [n, H] back from a strided device buffer; also returns whether every gap byte still
// holds `gap_byte` (nothing written outside the rows).
std::vector<float> download_strided(moekit_dtype_t dtype, const DeviceBuffer& b, int64_t rows, int64_t H,
                                    int64_t stride, int64_t offset, int gap_byte, bool* gaps_intact) {
  const size_t es = moekit::test::dtype_bytes(dtype);
  const auto bytes = b.to_host<uint8_t>();
  std::vector<uint8_t> packed(rows * H * es);
  std::vector<bool> inside(bytes.size(), false);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(&packed[r * H * es], &bytes[(offset + r * stride) * es], H * es);
    for (size_t i = 0; i < H * es; ++i) inside[(offset + r * stride) * es + i] = true;
  }
  *gaps_intact = true;
  for (size_t i = 0; i < bytes.size(); ++i)
    if (!inside[i] && bytes[i] != gap_byte) *gaps_intact = false;
  return moekit::test::unpack(dtype, packed);
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// Within the dtype tolerance of the double reference rounded to the dtype, widened by the bound
// of an fp32 sum of `terms` terms whose magnitudes add up to `abs_sum` (cancellation can leave a
// small result carrying the absolute rounding error of large terms).
bool near_reference(moekit_dtype_t dt, float got, double ref, double abs_sum, int terms) {
  const auto tol = moekit::test::tolerance_for(dt);
  const double r = moekit::test::round_to(dt, static_cast<float>(ref));
  return std::fabs(got - r) <= tol.atol + tol.rtol * std::fabs(r) + terms * 0x1p-24 * abs_sum;
}

struct MoveCase {
  moekit_dtype_t dtype;
  moekit::test::PlanCase plan;
  int64_t hidden;
  int64_t token_stride_extra;  // token-side row stride = H + this
  int64_t token_offset;        // token-side tensors start this many elements into their buffer
  int64_t row_offset;          // row-side tensors start this many elements into their buffer
};

const char* dtype_name(moekit_dtype_t d) {
  return d == MOEKIT_DTYPE_F32 ? "f32" : d == MOEKIT_DTYPE_F16 ? "f16" : "bf16";
}

// All four movement ops of one case, each run twice (bitwise determinism), checked bitwise
// against the fp32 emulation of the documented arithmetic and against the double reference.
void check_movement_case(std::mt19937_64& rng, const MoveCase& mc) {
  const auto& pc = mc.plan;
  const moekit_dtype_t dt = mc.dtype;
  const int64_t T = pc.tokens, H = mc.hidden, K = pc.config.top_k;
  const int64_t stride = H + mc.token_stride_extra, toff = mc.token_offset, roff = mc.row_offset;
  const size_t es = moekit::test::dtype_bytes(dt);
  INFO(dtype_name(dt) << " H=" << H << " stride=" << stride << " token_offset=" << toff
                      << " row_offset=" << roff << " " << moekit::test::describe(pc.config, T));
  Stream stream;
  Routed r(rng, pc, false);
  DevicePlan d(pc.config, T);
  MOEKIT_REQUIRE_OK(d.build(r, stream.s));
  CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
  const auto plan = d.download();
  require_plan_equal(r.reference(), plan);
  const int64_t max_rows = d.max_rows, total = plan.total;
  const std::vector<float>& w = r.weights;

  auto row_buffer = [&](int byte) {
    DeviceBuffer b((roff + std::max<int64_t>(max_rows, 1) * H) * es);
    fill(b, byte);
    return b;
  };
  auto row_ptr = [&](DeviceBuffer& b) { return static_cast<char*>(b.get()) + roff * es; };
  auto token_ptr = [&](DeviceBuffer& b) { return static_cast<char*>(b.get()) + toff * es; };
  auto rows_of = [&](const DeviceBuffer& b) {
    auto bytes = b.to_host<uint8_t>();
    return std::vector<uint8_t>(bytes.begin() + roff * es, bytes.end());
  };
  // Rows past the total and the bytes before the first row still hold the poison.
  auto rows_past_total_poisoned = [&](const DeviceBuffer& b) {
    const auto bytes = b.to_host<uint8_t>();
    for (int64_t i = 0; i < roff * static_cast<int64_t>(es); ++i)
      if (bytes[i] != 0xff) return false;
    for (size_t i = (roff + total * H) * es; i < bytes.size(); ++i)
      if (bytes[i] != 0xff) return false;
    return true;
  };

  // ---- permute ----
  const auto x = random_values(rng, dt, T * H);
  DeviceBuffer d_x = upload_strided(dt, x, T, H, stride, toff);
  std::vector<std::vector<uint8_t>> xp_runs, rw_runs;
  for (int run = 0; run < 2; ++run) {
    DeviceBuffer xp = row_buffer(0xff);
    DeviceBuffer rw(sizeof(float) * std::max<int64_t>(max_rows, 1));
    fill(rw, 0xff);
    MOEKIT_REQUIRE_OK(moekit_tokens_permute(&pc.config, &d.plan, T, H, dt, token_ptr(d_x), stride,
                                            r.d_weights.get<float>(), row_ptr(xp), rw.get<float>(),
                                            stream.s));
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    REQUIRE(rows_past_total_poisoned(xp));
    const auto xp_vals = moekit::test::unpack(dt, rows_of(xp));
    const auto rw_vals = rw.to_host<float>();
    for (int64_t row = 0; row < total; ++row) {
      const int32_t s = plan.slot_of_row[row];
      INFO("xp row " << row << " (slot " << s << ")");
      for (int64_t h = 0; h < H; ++h) {
        const float want = s >= 0 ? x[(s / K) * H + h] : 0.0f;
        if (!same_bits(want, xp_vals[row * H + h])) {
          INFO("h = " << h << ": want " << want << ", got " << xp_vals[row * H + h]);
          REQUIRE(same_bits(want, xp_vals[row * H + h]));
        }
      }
      REQUIRE(same_bits(s >= 0 ? w[s] : 0.0f, rw_vals[row]));
    }
    for (int64_t row = total; row < max_rows; ++row) {
      uint32_t bits;
      std::memcpy(&bits, &rw_vals[row], 4);
      REQUIRE(bits == 0xffffffffu);
    }
    xp_runs.push_back(xp.to_host<uint8_t>());
    rw_runs.push_back(rw.to_host<uint8_t>());
  }
  REQUIRE(xp_runs[0] == xp_runs[1]);
  REQUIRE(rw_runs[0] == rw_runs[1]);

  // The same permute without row weights writes the same rows.
  {
    DeviceBuffer xp = row_buffer(0xff);
    MOEKIT_REQUIRE_OK(moekit_tokens_permute(&pc.config, &d.plan, T, H, dt, token_ptr(d_x), stride,
                                            nullptr, row_ptr(xp), nullptr, stream.s));
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    REQUIRE(xp.to_host<uint8_t>() == xp_runs[0]);
  }

  // ---- combine (weighted and unweighted) ----
  // yp: random in every row (padding rows too: no slot points at them, so they must not matter).
  const auto yp = random_values(rng, dt, max_rows * H);
  std::vector<uint8_t> yp_bytes(roff * es, 0);
  const auto yp_packed = moekit::test::pack(dt, yp);
  yp_bytes.insert(yp_bytes.end(), yp_packed.begin(), yp_packed.end());
  DeviceBuffer d_yp = DeviceBuffer::from(yp_bytes.empty() ? std::vector<uint8_t>(16) : yp_bytes);
  for (bool weighted : {true, false}) {
    INFO((weighted ? "weighted combine" : "unweighted combine"));
    // fp32 emulation: acc = fmaf(w, yp, acc) in k order, one rounding.
    std::vector<float> emulated(T * H);
    std::vector<double> abs_sum(T * H, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
          const int32_t row = plan.row_of_slot[t * K + k];
          if (row < 0) continue;
          const float wk = weighted ? w[t * K + k] : 1.0f;
          acc = std::fmaf(wk, yp[row * H + h], acc);
          abs_sum[t * H + h] += std::fabs(static_cast<double>(wk) * yp[row * H + h]);
        }
        emulated[t * H + h] = moekit::test::round_to(dt, acc);
      }
    const auto ref = moekit::ref::combine(plan, static_cast<int>(K), T, H, to_double(yp),
                                          weighted ? to_double(w) : std::vector<double>{});
    std::vector<std::vector<uint8_t>> runs;
    for (int run = 0; run < 2; ++run) {
      DeviceBuffer y = upload_strided(dt, std::vector<float>(T * H, 0.0f), T, H, stride, toff, 0xee);
      fill(y, 0xee);
      MOEKIT_REQUIRE_OK(moekit_tokens_combine(&pc.config, &d.plan, T, H, dt, row_ptr(d_yp),
                                              weighted ? r.d_weights.get<float>() : nullptr,
                                              token_ptr(y), stride, stream.s));
      CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
      bool gaps = false;
      const auto got = download_strided(dt, y, T, H, stride, toff, 0xee, &gaps);
      REQUIRE(gaps);
      for (int64_t i = 0; i < T * H; ++i) {
        if (!same_bits(emulated[i], got[i]) ||
            !near_reference(dt, got[i], ref[i], abs_sum[i], static_cast<int>(K))) {
          INFO("y[" << i / H << ", " << i % H << "]: emulated " << emulated[i] << ", reference "
                    << ref[i] << ", device " << got[i]);
          REQUIRE(same_bits(emulated[i], got[i]));
          REQUIRE(near_reference(dt, got[i], ref[i], abs_sum[i], static_cast<int>(K)));
        }
      }
      runs.push_back(y.to_host<uint8_t>());
    }
    REQUIRE(runs[0] == runs[1]);
  }

  // ---- permute backward ----
  {
    const auto dxp = random_values(rng, dt, max_rows * H);
    std::vector<uint8_t> dxp_bytes(roff * es, 0);
    const auto packed = moekit::test::pack(dt, dxp);
    dxp_bytes.insert(dxp_bytes.end(), packed.begin(), packed.end());
    DeviceBuffer d_dxp = DeviceBuffer::from(dxp_bytes.empty() ? std::vector<uint8_t>(16) : dxp_bytes);
    const auto drw = moekit::test::normal(rng, std::max<int64_t>(max_rows, 1), 0.0f, 1.0f);
    DeviceBuffer d_drw = DeviceBuffer::from(drw);
    std::vector<std::vector<uint8_t>> runs;
    for (int run = 0; run < 2; ++run) {
      DeviceBuffer dx = upload_strided(dt, std::vector<float>(T * H, 0.0f), T, H, stride, toff, 0xee);
      fill(dx, 0xee);
      DeviceBuffer dw(sizeof(float) * std::max<int64_t>(T * K, 1));
      fill(dw, 0xff);
      MOEKIT_REQUIRE_OK(moekit_tokens_permute_backward(&pc.config, &d.plan, T, H, dt, row_ptr(d_dxp),
                                                       d_drw.get<float>(), token_ptr(dx), stride,
                                                       dw.get<float>(), stream.s));
      CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
      bool gaps = false;
      const auto got = download_strided(dt, dx, T, H, stride, toff, 0xee, &gaps);
      REQUIRE(gaps);
      std::vector<double> ref_dx, ref_dw;
      moekit::ref::permute_backward(plan, static_cast<int>(K), T, H, to_double(dxp), to_double(drw),
                                    &ref_dx, &ref_dw);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) {
          float acc = 0.0f;
          double abs_sum = 0.0;
          for (int64_t k = 0; k < K; ++k) {
            const int32_t row = plan.row_of_slot[t * K + k];
            if (row < 0) continue;
            acc = std::fmaf(1.0f, dxp[row * H + h], acc);
            abs_sum += std::fabs(dxp[row * H + h]);
          }
          const float want = moekit::test::round_to(dt, acc);
          const int64_t i = t * H + h;
          if (!same_bits(want, got[i]) || !near_reference(dt, got[i], ref_dx[i], abs_sum, static_cast<int>(K))) {
            INFO("dx[" << t << ", " << h << "]: emulated " << want << ", reference " << ref_dx[i]
                       << ", device " << got[i]);
            REQUIRE(same_bits(want, got[i]));
            REQUIRE(near_reference(dt, got[i], ref_dx[i], abs_sum, static_cast<int>(K)));
          }
        }
      const auto got_dw = dw.to_host<float>();
      for (int64_t s = 0; s < T * K; ++s) {
        INFO("dw[" << s << "]");
        REQUIRE(same_bits(static_cast<float>(ref_dw[s]), got_dw[s]));
      }
      runs.push_back(dx.to_host<uint8_t>());
      runs.push_back(dw.to_host<uint8_t>());
    }
    REQUIRE(runs[0] == runs[2]);
    REQUIRE(runs[1] == runs[3]);
  }

  // ---- combine backward ----
  for (bool weighted : {true, false}) {
    INFO((weighted ? "weighted combine backward" : "unweighted combine backward"));
    const auto dy = random_values(rng, dt, T * H);
    DeviceBuffer d_dy = upload_strided(dt, dy, T, H, stride, toff);
    std::vector<double> ref_dyp, ref_dw, scale;
    moekit::ref::combine_backward(plan, static_cast<int>(K), T, H, to_double(dy),
                                  weighted ? to_double(w) : std::vector<double>{}, to_double(yp),
                                  &ref_dyp, &ref_dw, &scale);
    std::vector<std::vector<uint8_t>> runs;
    for (int run = 0; run < 2; ++run) {
      DeviceBuffer dyp = row_buffer(0xff);
      DeviceBuffer dw(sizeof(float) * std::max<int64_t>(T * K, 1));
      fill(dw, 0xff);
      MOEKIT_REQUIRE_OK(moekit_tokens_combine_backward(
          &pc.config, &d.plan, T, H, dt, token_ptr(d_dy), stride,
          weighted ? r.d_weights.get<float>() : nullptr, row_ptr(d_yp), row_ptr(dyp),
          dw.get<float>(), stream.s));
      CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
      REQUIRE(rows_past_total_poisoned(dyp));
      const auto got = moekit::test::unpack(dt, rows_of(dyp));
      for (int64_t row = 0; row < total; ++row) {
        const int32_t s = plan.slot_of_row[row];
        for (int64_t h = 0; h < H; ++h) {
          const float want = s >= 0 ? moekit::test::round_to(dt, (weighted ? w[s] : 1.0f) * dy[(s / K) * H + h]) : 0.0f;
          const float g = got[row * H + h];
          if (!same_bits(want, g) || !near_reference(dt, g, ref_dyp[row * H + h], 0.0, 0)) {
            INFO("dyp[" << row << ", " << h << "] (slot " << s << "): emulated " << want << ", reference "
                        << ref_dyp[row * H + h] << ", device " << g);
            REQUIRE(same_bits(want, g));
            REQUIRE(near_reference(dt, g, ref_dyp[row * H + h], 0.0, 0));
          }
        }
      }
      const auto got_dw = dw.to_host<float>();
      for (int64_t s = 0; s < T * K; ++s) {
        // fp32 dot over H: bounded by a few ulps of the sum of |terms| (fixed-order tree).
        const double allowed = 1e-5 * scale[s] + 1e-30;
        if (!(std::fabs(got_dw[s] - ref_dw[s]) <= allowed)) {
          INFO("dw[" << s << "]: reference " << ref_dw[s] << " (scale " << scale[s] << "), device "
                     << got_dw[s]);
          REQUIRE(std::fabs(got_dw[s] - ref_dw[s]) <= allowed);
        }
        if (plan.row_of_slot[s] < 0) REQUIRE(same_bits(0.0f, got_dw[s]));
      }
      runs.push_back(dyp.to_host<uint8_t>());
      runs.push_back(dw.to_host<uint8_t>());
    }
    REQUIRE(runs[0] == runs[2]);
    REQUIRE(runs[1] == runs[3]);

    // Each output alone gives the same bits.
    DeviceBuffer dyp_only = row_buffer(0xff);
    MOEKIT_REQUIRE_OK(moekit_tokens_combine_backward(&pc.config, &d.plan, T, H, dt, token_ptr(d_dy), stride,
                                                     weighted ? r.d_weights.get<float>() : nullptr,
                                                     nullptr, row_ptr(dyp_only), nullptr, stream.s));
    DeviceBuffer dw_only(sizeof(float) * std::max<int64_t>(T * K, 1));
    fill(dw_only, 0xff);
    MOEKIT_REQUIRE_OK(moekit_tokens_combine_backward(&pc.config, &d.plan, T, H, dt, token_ptr(d_dy), stride,
                                                     weighted ? r.d_weights.get<float>() : nullptr,
                                                     row_ptr(d_yp), nullptr, dw_only.get<float>(), stream.s));
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    REQUIRE(dyp_only.to_host<uint8_t>() == runs[0]);
    REQUIRE(dw_only.to_host<uint8_t>() == runs[1]);
  }
}

std::vector<MoveCase> movement_cases(moekit_dtype_t dt) {
  using R = Routing;
  const int pos = MOEKIT_DROP_BY_POSITION;
  using PC = moekit::test::PlanCase;
  return {
      // vector path, one warp per token, padding, mask, invalid ids
      {dt, PC{300, plan_config(16, 4, 8), R::kDistinct, 0.02, 0.8}, 64, 0, 0, 0},
      // wide rows: 128 or 256 threads per token
      {dt, PC{33, plan_config(8, 2), R::kDistinct, 0, 1}, 7168, 0, 0, 0},
      // 64 threads per token, capacity drops, A = 16
      {dt, PC{200, plan_config(64, 8, 16, 30, pos), R::kSkewed, 0, 1}, 4096, 0, 0, 0},
      // odd H: scalar path
      {dt, PC{97, plan_config(10, 3, 4), R::kAny, 0, 1}, 13, 0, 0, 0},
      {dt, PC{50, plan_config(10, 3, 1), R::kAny, 0, 1}, 1001, 0, 0, 0},
      // a padded row stride that keeps 16-byte alignment: vector path
      {dt, PC{120, plan_config(32, 6), R::kDistinct, 0, 1}, 1000, 8, 0, 0},
      // a stride that breaks alignment: scalar path
      {dt, PC{64, plan_config(32, 4, 8), R::kDistinct, 0, 1}, 64, 1, 0, 0},
      // misaligned base pointers: scalar path
      {dt, PC{64, plan_config(32, 4, 8), R::kDistinct, 0, 1}, 64, 0, 1, 0},
      {dt, PC{64, plan_config(32, 4, 8), R::kDistinct, 0, 1}, 64, 0, 0, 3},
      // K = 32 rows per token
      {dt, PC{150, plan_config(64, 32, 8), R::kDistinct, 0, 1}, 8, 0, 0, 0},
      // expert parallelism: most tokens have no local row
      {dt, PC{256, plan_config(64, 8, 8, 0, pos, 16, 16), R::kDistinct, 0, 1}, 128, 0, 0, 0},
      // every token masked: no rows at all
      {dt, PC{40, plan_config(16, 2, 8), R::kDistinct, 0, 0}, 64, 0, 0, 0},
      // rows past 8 accesses per thread of 256: permute's scatter takes several passes
      // (vector path: 2 or 3 passes; scalar path: 3 passes)
      {dt, PC{9, plan_config(8, 2, 4), R::kDistinct, 0, 1}, 20000, 0, 0, 0},
      {dt, PC{9, plan_config(8, 3, 1), R::kAny, 0, 1}, 4099, 0, 0, 0},
      // f32 vectors hold 4 elements: H = 4 is a vector row for f32 only, H = 6 never
      {dt, PC{70, plan_config(8, 2, 2), R::kDistinct, 0, 1}, 4, 0, 0, 0},
      {dt, PC{70, plan_config(8, 2, 2), R::kDistinct, 0, 1}, 6, 0, 0, 0},
  };
}

}  // namespace

TEST_CASE("permute, combine and backwards in f32", "[gpu][tokens][movement]") {
  auto rng = moekit::test::make_rng(0x91b0);
  for (const auto& mc : movement_cases(MOEKIT_DTYPE_F32)) check_movement_case(rng, mc);
}

TEST_CASE("permute, combine and backwards in bf16", "[gpu][tokens][movement]") {
  auto rng = moekit::test::make_rng(0x91b1);
  for (const auto& mc : movement_cases(MOEKIT_DTYPE_BF16)) check_movement_case(rng, mc);
}

TEST_CASE("permute, combine and backwards in f16", "[gpu][tokens][movement]") {
  auto rng = moekit::test::make_rng(0x91b2);
  for (const auto& mc : movement_cases(MOEKIT_DTYPE_F16)) check_movement_case(rng, mc);
}

namespace {

// Random values of `dtype` with about 1 % specials mixed in: -0, +0, +-inf, NaN, the largest
// finite value of the dtype (twice it overflows) and the smallest subnormal of the dtype.
std::vector<float> values_with_specials(std::mt19937_64& rng, moekit_dtype_t dtype, size_t n) {
  auto v = random_values(rng, dtype, n);
  const float inf = std::numeric_limits<float>::infinity();
  const float largest = dtype == MOEKIT_DTYPE_F32    ? std::numeric_limits<float>::max()
                        : dtype == MOEKIT_DTYPE_F16 ? 65504.0f
                                                     : moekit::test::bf16_bits_to_float(0x7f7f);
  const float tiniest = dtype == MOEKIT_DTYPE_F32    ? std::numeric_limits<float>::denorm_min()
                        : dtype == MOEKIT_DTYPE_F16 ? 0x1p-24f
                                                     : moekit::test::bf16_bits_to_float(0x0001);
  const float specials[] = {-0.0f, 0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(),
                            largest, -largest, tiniest, -tiniest};
  std::bernoulli_distribution special(0.01);
  std::uniform_int_distribution<int> which(0, 8);
  for (auto& x : v)
    if (special(rng)) x = specials[which(rng)];
  return v;
}

}  // namespace

// Every real token has K rows holding its x (distinct local experts, no capacity) and a masked
// token has none, so the unweighted combine of the permuted rows is K x for a real token and
// zeros for a masked one. Bitwise for every dtype, against the documented arithmetic: the rows'
// values added in fp32 from +0 in k order (fmaf(1, v, acc)), rounded once. So a token with no
// rows is +0 whatever x holds (not 0 * x, which is -0 for negative x and NaN for NaN), and a sum
// of -0 terms is +0 (as torch.zeros(...).index_add_ gives). For 16-bit types this is also the
// closed form round(rows * x): rows <= 32 times a 16-bit value is exact in fp32 (or +-inf both
// ways), checked on its own.
TEST_CASE("round trip: permute then unweighted combine gives (rows of t) x", "[gpu][tokens][movement]") {
  auto rng = moekit::test::make_rng(0x91b3);
  for (moekit_dtype_t dt : {MOEKIT_DTYPE_BF16, MOEKIT_DTYPE_F16, MOEKIT_DTYPE_F32}) {
    for (int K : {1, 2, 8, 32}) {
      for (int64_t H : {264, 263}) {  // 16-byte rows (vector path) and odd rows (scalar path)
        const auto cfg = plan_config(64, K, 8);
        const int64_t T = 333;
        INFO(dtype_name(dt) << " K=" << K << " H=" << H);
        Stream stream;
        Routed r(rng, moekit::test::PlanCase{T, cfg, Routing::kDistinct, 0, 0.9});
        DevicePlan d(cfg, T);
        MOEKIT_REQUIRE_OK(d.build(r, stream.s));
        const auto x = values_with_specials(rng, dt, T * H);
        DeviceBuffer d_x = DeviceBuffer::from(moekit::test::pack(dt, x));
        DeviceBuffer xp(d.max_rows * H * moekit::test::dtype_bytes(dt));
        DeviceBuffer y(T * H * moekit::test::dtype_bytes(dt));
        fill(y, 0xff);
        MOEKIT_REQUIRE_OK(moekit_tokens_permute(&cfg, &d.plan, T, H, dt, d_x.get(), H, nullptr, xp.get(),
                                                nullptr, stream.s));
        MOEKIT_REQUIRE_OK(moekit_tokens_combine(&cfg, &d.plan, T, H, dt, xp.get(), nullptr, y.get(), H,
                                                stream.s));
        CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
        const auto plan = d.download();
        const auto got = moekit::test::unpack(dt, y.to_host<uint8_t>());
        int64_t masked = 0;
        for (int64_t t = 0; t < T; ++t) {
          int rows = 0;
          for (int k = 0; k < K; ++k) rows += plan.row_of_slot[t * K + k] >= 0;
          REQUIRE(rows == (r.mask[t] != 0 ? K : 0));
          masked += rows == 0;
          for (int64_t h = 0; h < H; ++h) {
            const float v = x[t * H + h];
            const float g = got[t * H + h];
            float acc = 0.0f;
            for (int j = 0; j < rows; ++j) acc = std::fmaf(1.0f, v, acc);
            const float want = moekit::test::round_to(dt, acc);
            const bool ok = std::isnan(want) ? std::isnan(g) : same_bits(want, g);
            // The closed form, independent of the emulation.
            bool closed_ok = true;
            if (rows == 0 || v == 0.0f) {
              closed_ok = same_bits(g, 0.0f);
            } else if (std::isnan(v)) {
              closed_ok = std::isnan(g);
            } else if (dt != MOEKIT_DTYPE_F32) {
              closed_ok = same_bits(g, moekit::test::round_to(dt, static_cast<float>(rows) * v));
            } else if (std::isfinite(g)) {  // rows * x in f32 may need more than 24 bits
              closed_ok = moekit::test::close(g, rows * static_cast<double>(v), moekit::test::tolerance_for(dt));
            }
            if (!ok || !closed_ok) {
              INFO("y[" << t << ", " << h << "]: rows " << rows << ", x " << v << ", emulated " << want
                        << ", device " << g << (std::signbit(g) ? " (sign bit set)" : ""));
              REQUIRE(ok);
              REQUIRE(closed_ok);
            }
          }
        }
        REQUIRE(masked > 0);  // the +0 rule for tokens without rows was exercised
      }
    }
  }
}

TEST_CASE("plan, permute, combine and backwards run inside a CUDA graph", "[gpu][tokens][graph]") {
  auto rng = moekit::test::make_rng(0x91c0);
  const auto cfg = plan_config(257, 8, 16);
  const int64_t T = 1500, H = 512, K = 8;
  const moekit_dtype_t dt = MOEKIT_DTYPE_BF16;
  const size_t es = 2;
  Stream stream;
  Routed r(rng, moekit::test::PlanCase{T, cfg, Routing::kSkewed, 0.01, 0.9});
  DevicePlan d(cfg, T);
  const auto x = random_values(rng, dt, T * H);
  const auto dy = random_values(rng, dt, T * H);
  DeviceBuffer d_x = DeviceBuffer::from(moekit::test::pack(dt, x));
  DeviceBuffer d_dy = DeviceBuffer::from(moekit::test::pack(dt, dy));
  DeviceBuffer xp(d.max_rows * H * es), rw(d.max_rows * 4), y(T * H * es), dyp(d.max_rows * H * es),
      dw(T * K * 4), dx(T * H * es), dw2(T * K * 4);
  for (DeviceBuffer* b : {&xp, &rw, &y, &dyp, &dw, &dx, &dw2}) fill(*b, 0xff);

  cudaGraph_t graph = nullptr;
  CUDA_REQUIRE(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
  const moekit_status_t s1 = d.build(r, stream.s);
  const moekit_status_t s2 = moekit_tokens_permute(&cfg, &d.plan, T, H, dt, d_x.get(), H,
                                                   r.d_weights.get<float>(), xp.get(), rw.get<float>(), stream.s);
  const moekit_status_t s3 = moekit_tokens_combine(&cfg, &d.plan, T, H, dt, xp.get(),
                                                   r.d_weights.get<float>(), y.get(), H, stream.s);
  const moekit_status_t s4 = moekit_tokens_combine_backward(&cfg, &d.plan, T, H, dt, d_dy.get(), H,
                                                            r.d_weights.get<float>(), xp.get(), dyp.get(),
                                                            dw.get<float>(), stream.s);
  const moekit_status_t s5 = moekit_tokens_permute_backward(&cfg, &d.plan, T, H, dt, dyp.get(), rw.get<float>(),
                                                            dx.get(), H, dw2.get<float>(), stream.s);
  const cudaError_t end = cudaStreamEndCapture(stream.s, &graph);
  INFO(moekit_get_last_error());
  REQUIRE(s1 == MOEKIT_STATUS_SUCCESS);
  REQUIRE(s2 == MOEKIT_STATUS_SUCCESS);
  REQUIRE(s3 == MOEKIT_STATUS_SUCCESS);
  REQUIRE(s4 == MOEKIT_STATUS_SUCCESS);
  REQUIRE(s5 == MOEKIT_STATUS_SUCCESS);
  CUDA_REQUIRE(end);
  // Nothing ran during capture.
  REQUIRE(d.untouched());
  REQUIRE(all_bytes(y, 0xff));
  cudaGraphExec_t exec = nullptr;
  CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
  for (int launch = 0; launch < 2; ++launch) {  // a graph replays with the same result
    CUDA_REQUIRE(cudaGraphLaunch(exec, stream.s));
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    const auto plan = d.download();
    require_plan_equal(r.reference(), plan);
    const auto got_y = moekit::test::unpack(dt, y.to_host<uint8_t>());
    const auto xp_vals = moekit::test::unpack(dt, xp.to_host<uint8_t>());
    const auto ref_y = moekit::ref::combine(plan, K, T, H, to_double(xp_vals), to_double(r.weights));
    for (int64_t i = 0; i < T * H; ++i)
      REQUIRE(moekit::test::close(got_y[i], moekit::test::round_to(dt, static_cast<float>(ref_y[i])),
                                  moekit::test::tolerance_for(dt)));
    std::vector<double> ref_dx, ref_dw2;
    const auto dyp_vals = moekit::test::unpack(dt, dyp.to_host<uint8_t>());
    moekit::ref::permute_backward(plan, K, T, H, to_double(dyp_vals), to_double(rw.to_host<float>()),
                                  &ref_dx, &ref_dw2);
    const auto got_dx = moekit::test::unpack(dt, dx.to_host<uint8_t>());
    for (int64_t i = 0; i < T * H; ++i)
      REQUIRE(moekit::test::close(got_dx[i], moekit::test::round_to(dt, static_cast<float>(ref_dx[i])),
                                  moekit::test::tolerance_for(dt)));
    const auto got_dw2 = dw2.to_host<float>();
    for (int64_t s = 0; s < T * K; ++s) REQUIRE(same_bits(static_cast<float>(ref_dw2[s]), got_dw2[s]));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

TEST_CASE("plans that need more than 48 KiB of shared memory capture too", "[gpu][tokens][graph]") {
  // E_local > 1536 raises the scatter kernel's dynamic shared-memory limit on every call.
  auto rng = moekit::test::make_rng(0x91c1);
  for (const auto& cfg : {plan_config(4096, 8, 8), plan_config(9000, 8, 1, 300, MOEKIT_DROP_BY_WEIGHT, 4000, 4096)}) {
    INFO(moekit::test::describe(cfg, 3000));
    Stream stream;
    Routed r(rng, moekit::test::PlanCase{3000, cfg, Routing::kAny, 0.01, 1});
    DevicePlan d(cfg, 3000);
    cudaGraph_t graph = nullptr;
    CUDA_REQUIRE(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
    const moekit_status_t status = d.build(r, stream.s);
    const cudaError_t end = cudaStreamEndCapture(stream.s, &graph);
    INFO(moekit_get_last_error());
    REQUIRE(status == MOEKIT_STATUS_SUCCESS);
    CUDA_REQUIRE(end);
    cudaGraphExec_t exec = nullptr;
    CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_REQUIRE(cudaGraphLaunch(exec, stream.s));
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    require_plan_equal(r.reference(), d.download());
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
}

TEST_CASE("rejected calls leave poisoned device outputs untouched", "[gpu][tokens][validation]") {
  auto rng = moekit::test::make_rng(0x91d0);
  const auto cfg = plan_config(32, 4, 8);
  const auto by_weight = plan_config(32, 4, 8, 10, MOEKIT_DROP_BY_WEIGHT);
  const int64_t T = 200, H = 64, K = 4;
  const moekit_dtype_t dt = MOEKIT_DTYPE_BF16;
  Stream stream;
  Routed r(rng, moekit::test::PlanCase{T, cfg, Routing::kDistinct, 0, 1});
  DevicePlan d(cfg, T);
  DevicePlan dw_plan(by_weight, T);

  auto expect = [&](const char* what, moekit_status_t got, moekit_status_t want, const char* message) {
    INFO(what << ": " << moekit_get_last_error());
    REQUIRE(got == want);
    REQUIRE(std::string(moekit_get_last_error()).find(message) != std::string::npos);
    CUDA_REQUIRE(cudaDeviceSynchronize());
  };
  // Plan: too small / misaligned / missing workspace, missing weights for drop by weight.
  expect("workspace too small",
         moekit_plan_build(&cfg, T, r.d_indices.get<int32_t>(), nullptr, nullptr, &d.plan, d.workspace.get(),
                           d.workspace.bytes() - 1, stream.s),
         MOEKIT_STATUS_WORKSPACE_TOO_SMALL, "workspace_bytes");
  DeviceBuffer big_ws(d.workspace.bytes() + 256);
  expect("workspace misaligned",
         moekit_plan_build(&cfg, T, r.d_indices.get<int32_t>(), nullptr, nullptr, &d.plan,
                           static_cast<char*>(big_ws.get()) + 1, d.workspace.bytes(), stream.s),
         MOEKIT_STATUS_MISALIGNED, "workspace");
  expect("weights missing",
         moekit_plan_build(&by_weight, T, r.d_indices.get<int32_t>(), nullptr, nullptr, &dw_plan.plan,
                           dw_plan.workspace.get(), dw_plan.workspace.bytes(), stream.s),
         MOEKIT_STATUS_INVALID_ARGUMENT, "weights is NULL");
  REQUIRE(d.untouched());
  REQUIRE(dw_plan.untouched());

  // A good plan for the movement calls.
  MOEKIT_REQUIRE_OK(d.build(r, stream.s));
  CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
  DeviceBuffer x(T * H * 2), xp(d.max_rows * H * 2), rw(d.max_rows * 4), y(T * H * 2), dw(T * K * 4);
  fill(x, 0x3c);
  auto poison_outputs = [&] {
    for (DeviceBuffer* b : {&xp, &rw, &y, &dw}) fill(*b, 0xff);
  };
  auto outputs_poisoned = [&] {
    return moekit::test::still_poisoned(xp) && moekit::test::still_poisoned(rw) &&
           moekit::test::still_poisoned(y) && moekit::test::still_poisoned(dw);
  };
  poison_outputs();
  expect("permute stride", moekit_tokens_permute(&cfg, &d.plan, T, H, dt, x.get(), H - 8, r.d_weights.get<float>(),
                                                 xp.get(), rw.get<float>(), stream.s),
         MOEKIT_STATUS_INVALID_ARGUMENT, "x_row_stride = 56");
  expect("permute half of a pair", moekit_tokens_permute(&cfg, &d.plan, T, H, dt, x.get(), H, r.d_weights.get<float>(),
                                                         xp.get(), nullptr, stream.s),
         MOEKIT_STATUS_INVALID_ARGUMENT, "give both or neither");
  expect("permute dtype", moekit_tokens_permute(&cfg, &d.plan, T, H, static_cast<moekit_dtype_t>(3), x.get(), H,
                                                nullptr, xp.get(), nullptr, stream.s),
         MOEKIT_STATUS_UNSUPPORTED, "dtype = 3");
  expect("combine stride", moekit_tokens_combine(&cfg, &d.plan, T, H, dt, xp.get(), nullptr, y.get(), 7, stream.s),
         MOEKIT_STATUS_INVALID_ARGUMENT, "y_row_stride = 7");
  expect("combine T", moekit_tokens_combine(&cfg, &d.plan, -3, H, dt, xp.get(), nullptr, y.get(), H, stream.s),
         MOEKIT_STATUS_INVALID_ARGUMENT, "num_tokens = -3");
  expect("permute backward pair",
         moekit_tokens_permute_backward(&cfg, &d.plan, T, H, dt, xp.get(), nullptr, y.get(), H, dw.get<float>(), stream.s),
         MOEKIT_STATUS_INVALID_ARGUMENT, "give both or neither");
  expect("combine backward yp", moekit_tokens_combine_backward(&cfg, &d.plan, T, H, dt, x.get(), H, nullptr, nullptr,
                                                               xp.get(), dw.get<float>(), stream.s),
         MOEKIT_STATUS_INVALID_ARGUMENT, "yp is NULL");
  moekit_plan_config_t other = cfg;
  other.top_k = 40;
  expect("combine backward config", moekit_tokens_combine_backward(&other, &d.plan, T, H, dt, x.get(), H, nullptr,
                                                                   xp.get(), xp.get(), dw.get<float>(), stream.s),
         MOEKIT_STATUS_INVALID_ARGUMENT, "config->top_k = 40");
  REQUIRE(outputs_poisoned());
}

TEST_CASE("a corrupt plan never makes a kernel write out of bounds", "[gpu][tokens][validation]") {
  // Rows outside [0, max_rows) and garbage counts/offsets are ignored by the movement kernels
  // (compute-sanitizer memcheck proves no access strays; here: no error and no write past the
  // buffers' ends, which are guarded by a poisoned margin).
  auto rng = moekit::test::make_rng(0x91d1);
  const auto cfg = plan_config(16, 4, 8);
  const int64_t T = 300, H = 32, K = 4;
  int64_t max_rows = 0;
  REQUIRE(moekit_plan_max_rows(&cfg, T, &max_rows) == MOEKIT_STATUS_SUCCESS);
  std::uniform_int_distribution<int32_t> any(INT_MIN, INT_MAX);
  std::uniform_int_distribution<int32_t> near(-5, static_cast<int32_t>(max_rows) + 5);
  std::vector<int32_t> rows(T * K), counts(16), offsets(17);
  for (auto& v : rows) v = (any(rng) & 1) ? any(rng) : near(rng);
  for (auto& v : counts) v = (any(rng) & 1) ? any(rng) : near(rng);
  for (auto& v : offsets) v = (any(rng) & 1) ? any(rng) : near(rng);
  DeviceBuffer d_rows = DeviceBuffer::from(rows), d_counts = DeviceBuffer::from(counts),
               d_offsets = DeviceBuffer::from(offsets);
  moekit_token_plan_t plan;
  moekit_token_plan_init(&plan, sizeof(plan));
  plan.row_of_slot = d_rows.get<int32_t>();
  plan.expert_counts = d_counts.get<int32_t>();
  plan.expert_offsets = d_offsets.get<int32_t>();
  const int64_t margin = 4096;
  for (moekit_dtype_t dt : {MOEKIT_DTYPE_F32, MOEKIT_DTYPE_BF16}) {
    const size_t es = moekit::test::dtype_bytes(dt);
    DeviceBuffer x((T * H + margin) * es), xp((max_rows * H + margin) * es), rw((max_rows + margin) * 4),
        y((T * H + margin) * es), dw((T * K + margin) * 4), w((T * K) * 4), yp(max_rows * H * es);
    fill(x, 0x3c);
    fill(w, 0x3c);
    fill(yp, 0x3c);
    for (DeviceBuffer* b : {&xp, &rw, &y, &dw}) fill(*b, 0xff);
    Stream stream;
    MOEKIT_REQUIRE_OK(moekit_tokens_permute(&cfg, &plan, T, H, dt, x.get(), H, w.get<float>(), xp.get(),
                                            rw.get<float>(), stream.s));
    MOEKIT_REQUIRE_OK(moekit_tokens_combine(&cfg, &plan, T, H, dt, xp.get(), w.get<float>(), y.get(), H, stream.s));
    MOEKIT_REQUIRE_OK(moekit_tokens_combine_backward(&cfg, &plan, T, H, dt, y.get(), H, w.get<float>(), yp.get(),
                                                     xp.get(), dw.get<float>(), stream.s));
    MOEKIT_REQUIRE_OK(moekit_tokens_permute_backward(&cfg, &plan, T, H, dt, xp.get(), rw.get<float>(), y.get(), H,
                                                     dw.get<float>(), stream.s));
    CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
    auto margin_intact = [&](const DeviceBuffer& b, size_t used_bytes) {
      const auto bytes = b.to_host<uint8_t>();
      for (size_t i = used_bytes; i < bytes.size(); ++i)
        if (bytes[i] != 0xff) return false;
      return true;
    };
    REQUIRE(margin_intact(xp, max_rows * H * es));
    REQUIRE(margin_intact(rw, max_rows * 4));
    REQUIRE(margin_intact(y, T * H * es));
    REQUIRE(margin_intact(dw, T * K * 4));
  }
}

TEST_CASE("a plan bound into one device buffer works like separate arrays", "[gpu][tokens][plan]") {
  auto rng = moekit::test::make_rng(0x91e0);
  const auto cfg = plan_config(100, 6, 16, 0, MOEKIT_DROP_BY_POSITION, 20, 50);
  const int64_t T = 1234;
  Stream stream;
  Routed r(rng, moekit::test::PlanCase{T, cfg, Routing::kAny, 0.01, 0.9});
  size_t bytes = 0, ws_bytes = 0;
  REQUIRE(moekit_plan_buffer_size(&cfg, T, &bytes) == MOEKIT_STATUS_SUCCESS);
  REQUIRE(moekit_plan_workspace_size(&cfg, T, &ws_bytes) == MOEKIT_STATUS_SUCCESS);
  DeviceBuffer buffer(bytes), ws(ws_bytes);
  fill(buffer, kPlanPoisonByte);
  moekit_token_plan_t plan;
  moekit_token_plan_init(&plan, sizeof(plan));
  MOEKIT_REQUIRE_OK(moekit_plan_bind(&cfg, T, buffer.get(), bytes, &plan));
  MOEKIT_REQUIRE_OK(moekit_plan_build(&cfg, T, r.d_indices.get<int32_t>(), nullptr, r.mask_ptr(), &plan,
                                      ws.get(), ws_bytes, stream.s));
  CUDA_REQUIRE(cudaStreamSynchronize(stream.s));
  const auto want = r.reference();
  auto download = [&](const int32_t* p, size_t n) {
    std::vector<int32_t> v(n);
    if (n) CUDA_REQUIRE(cudaMemcpy(v.data(), p, n * 4, cudaMemcpyDeviceToHost));
    return v;
  };
  require_same(want.expert_counts, download(plan.expert_counts, 50), "expert_counts");
  require_same(want.expert_offsets, download(plan.expert_offsets, 51), "expert_offsets");
  require_same(want.row_of_slot, download(plan.row_of_slot, T * 6), "row_of_slot");
  require_same(want.slot_of_row, download(plan.slot_of_row, want.total), "slot_of_row");
  const auto totals = download(plan.totals, 3);
  REQUIRE(totals[0] == want.total);
  REQUIRE(totals[1] == want.dropped);
  REQUIRE(totals[2] == want.invalid);
}
