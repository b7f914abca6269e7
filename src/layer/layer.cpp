#include "src/layer/layer.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <new>

#include "kernels/layer/launch.hpp"
#include "kernels/layer/tuning.hpp"
#include "src/common/error.hpp"
#include "src/common/workspace.hpp"
#include "src/ep/ep_ops.hpp"
#include "src/ep/ep_plan.hpp"
#include "src/experts/experts_grouped.hpp"
#include "src/experts/mlp.hpp"
#include "src/router/router.hpp"
#include "src/tokens/movement.hpp"
#include "src/tokens/plan.hpp"

namespace moekit::layer {
namespace {

namespace kl = moekit::kernels::layer;

size_t bytes_of(moekit_dtype_t dtype) { return moekit_dtype_size(dtype); }

// The router options of the layer's own router calls: the load goes into the saved buffer and is
// never accumulated there (the aux loss needs this call's load); the caller's accumulation applies
// to the forward's expert_load output only.
moekit_router_config_t internal_router(const LayerConfig& c) {
  moekit_router_config_t r = c.router;
  r.accumulate_load = 0;
  return r;
}

// A bump allocator with phases: pieces that are never alive at the same time start at the same
// offset (rewind), and the buffer is as large as the high-water mark. Count-only with a null base:
// the size queries run the same code as the calls.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}

  template <class T>
  T* take(size_t count) {
    offset_ = WorkspaceCarver::align_up(offset_);
    T* piece = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(T);
    if (offset_ > high_) high_ = offset_;
    return piece;
  }
  void* bytes(size_t count) { return take<unsigned char>(count); }

  size_t mark() {
    offset_ = WorkspaceCarver::align_up(offset_);
    return offset_;
  }
  void rewind(size_t to) { offset_ = to; }
  size_t size() const { return WorkspaceCarver::align_up(high_); }

 private:
  char* base_;
  size_t offset_ = 0;
  size_t high_ = 0;
};

// ---- saved buffer -----------------------------------------------------------------------------
struct SavedLayout {
  void* logits = nullptr;       // [T, stride] logits dtype
  float* weights = nullptr;     // [T, K]
  int32_t* indices = nullptr;   // [T, K]
  int32_t* load = nullptr;      // [E]
  float* score_sum = nullptr;   // [E]
  int32_t* count = nullptr;     // [1]
  moekit_token_plan_t plan{};  // over the T tokens, or with expert parallelism over the received rows
  void* expert_u = nullptr;     // [R, NU]      unless recompute
  void* shared_u = nullptr;     // [T, NU_s]    shared, unless recompute
  void* xp = nullptr;           // [R, H]       the permuted rows, when saves_permuted
  float* row_weights = nullptr; // [R]          their routing weights, when saves_permuted
  float* gate_logit = nullptr;  // [T]          shared gate
  void* shared_out = nullptr;   // [T, H]       shared gate
  // expert parallelism: the layout and what the dispatch brought (Rr = the most rows it can bring);
  // the backward permutes recv_x again instead of dispatching x again
  void* ep_layout = nullptr;         // moekit_ep_layout's device layout
  void* recv_x = nullptr;            // [Rr, H]
  int32_t* recv_indices = nullptr;   // [Rr, K]
  float* recv_weights = nullptr;     // [Rr, K]
  uint8_t* recv_mask = nullptr;      // [Rr]
  int32_t* ep_dropped = nullptr;     // [1] (token, rank) pairs the EP capacity dropped
};

// Whether the forward keeps the permuted rows xp and their weights p for the backward (which
// then skips PERMUTE_RECOMPUTE): unless recompute, and without expert parallelism (whose saved
// buffer already holds the received rows the backward permutes again). Saving them is what the
// PyTorch composition's autograd does; it costs R (H es + 4) bytes of the saved buffer and saves
// a read and a write of R H es in the backward (0.27 GB each for Qwen3-30B at T = 16384).
bool saves_permuted(const LayerConfig& c) { return c.layer.recompute == 0 && c.ep == nullptr; }

SavedLayout carve_saved(WorkspaceCarver& ws, const LayerConfig& c, const CallShape& s) {
  const size_t T = static_cast<size_t>(s.num_tokens), R = static_cast<size_t>(s.plan.max_rows);
  const size_t Rr = static_cast<size_t>(s.recv_rows);
  const size_t K = static_cast<size_t>(c.top_k), E = static_cast<size_t>(c.num_experts);
  const size_t H = static_cast<size_t>(c.hidden), es = bytes_of(c.dtype);
  const bool recompute = c.layer.recompute != 0;
  SavedLayout l;
  l.logits = ws.take<unsigned char>(T * static_cast<size_t>(c.logits_stride) * bytes_of(c.logits_dtype), "logits");
  l.weights = ws.take<float>(T * K, "weights");
  l.indices = ws.take<int32_t>(T * K, "indices");
  l.load = ws.take<int32_t>(E, "expert_load");
  l.score_sum = ws.take<float>(E, "aux_score_sum");
  l.count = ws.take<int32_t>(1, "aux_token_count");
  l.plan = tokens::carve_plan_buffer(ws, s.plan);
  if (c.ep != nullptr) {
    l.ep_layout = ws.take<unsigned char>(c.ep_layout_bytes, "ep_layout");
    l.recv_x = ws.take<unsigned char>(Rr * H * es, "recv_x");
    l.recv_indices = ws.take<int32_t>(Rr * K, "recv_indices");
    l.recv_weights = ws.take<float>(Rr * K, "recv_weights");
    l.recv_mask = ws.take<uint8_t>(Rr, "recv_mask");
    l.ep_dropped = ws.take<int32_t>(1, "ep_dropped");
  }
  if (!recompute) l.expert_u = ws.take<unsigned char>(R * static_cast<size_t>(c.expert_nu) * es, "expert_u");
  if (c.has_shared && !recompute)
    l.shared_u = ws.take<unsigned char>(T * static_cast<size_t>(c.shared_nu) * es, "shared_u");
  if (saves_permuted(c)) {
    l.xp = ws.take<unsigned char>(R * H * es, "expert_xp");
    l.row_weights = ws.take<float>(R, "expert_row_weights");
  }
  if (c.gated_shared) {
    l.gate_logit = ws.take<float>(T, "shared_gate_logit");
    l.shared_out = ws.take<unsigned char>(T * H * es, "shared_out");
  }
  return l;
}

SavedLayout saved_layout(const LayerConfig& c, const CallShape& s, const void* saved) {
  WorkspaceCarver ws(const_cast<void*>(saved));
  return carve_saved(ws, c, s);
}

// ---- forward workspace ------------------------------------------------------------------------
struct ForwardLayout {
  // routing: projection, router, plan
  void* lt = nullptr;
  void* router_ws = nullptr;
  float* stats_ws = nullptr;     // [n, E] the ranks' S gathered (ep_global_statistics)
  void* plan_ws = nullptr;
  // routed experts
  void* xp = nullptr;            // [R, H]
  float* row_weights = nullptr;  // [R]
  void* yp = nullptr;            // [R, H]
  void* experts_ws = nullptr;
  // expert parallelism (alive from the dispatch to the combine; the plan's workspace may share
  // bytes with them: the stream orders its use between the two)
  void* ep_ws = nullptr;
  void* partials = nullptr;      // [Rr, H] this rank's sums for the rows it received
  // shared MLP
  void* shared_out = nullptr;    // [T, H] (in the saved buffer instead with a gate)
  void* mlp_ws = nullptr;
};

ForwardLayout carve_forward(Carver& ws, const LayerConfig& c, const CallShape& s) {
  const size_t T = static_cast<size_t>(s.num_tokens), R = static_cast<size_t>(s.plan.max_rows);
  const size_t H = static_cast<size_t>(c.hidden), es = bytes_of(c.dtype);
  ForwardLayout l;
  const size_t start = ws.mark();
  if (T > 0) l.lt = ws.bytes(kLtWorkspaceBytes);
  l.router_ws = ws.bytes(router::forward_workspace_bytes(internal_router(c), s.num_tokens));
  if (c.ep_global_statistics)
    l.stats_ws = ws.take<float>(static_cast<size_t>(c.ep->dims.num_ranks) * static_cast<size_t>(c.num_experts));
  l.plan_ws = ws.bytes(tokens::plan_workspace_bytes(s.plan));
  // A rank without tokens still serves the rows other ranks send its experts.
  if (T == 0 && c.ep == nullptr) return l;
  ws.rewind(start);
  if (c.ep != nullptr) {
    l.ep_ws = ws.bytes(c.ep_workspace_bytes);
    l.partials = ws.bytes(static_cast<size_t>(s.recv_rows) * H * es);
  }
  if (!saves_permuted(c)) {  // else in the saved buffer
    l.xp = ws.bytes(R * H * es);
    l.row_weights = ws.take<float>(R);
  }
  l.yp = ws.bytes(R * H * es);
  l.experts_ws = ws.bytes(experts::forward_workspace_bytes(c.experts, s.plan.max_rows));
  if (c.has_shared && T > 0) {
    ws.rewind(start);
    if (!c.gated_shared) l.shared_out = ws.bytes(T * H * es);
    l.mlp_ws = ws.bytes(experts::mlp_forward_workspace_bytes(c.shared, s.num_tokens));
  }
  return l;
}

// ---- backward workspace -----------------------------------------------------------------------
struct BackwardLayout {
  // alive through the whole call
  void* dx_shared = nullptr;          // [T, H]   shared MLP's dx
  float* grad_gate = nullptr;         // [T]      d(x . w_g)
  float* grad_weights = nullptr;      // [T, K]
  void* grad_logits = nullptr;        // [T, stride] logits dtype
  // shared phase
  void* grad_shared = nullptr;        // [T, H]   g dy (with the gate)
  void* mlp_ws = nullptr;
  float* gate_partial = nullptr;
  // routed phase
  void* xp = nullptr;                 // [R, H]
  float* row_weights = nullptr;       // [R]
  void* grad_yp = nullptr;            // [R, H]
  void* grad_xp = nullptr;            // [R, H]
  float* grad_row_weights = nullptr;  // [R]
  void* experts_ws = nullptr;
  // expert parallelism, routed phase
  void* ep_ws = nullptr;
  void* grad_partials = nullptr;      // [Rr, H]  dy at the received rows
  void* grad_recv_x = nullptr;        // [Rr, H]
  float* grad_recv_weights = nullptr; // [Rr, K]
  // router and projection phase (the router backward needs no workspace: router.h)
  float* dx_router = nullptr;         // [T, H] fp32
  float* w32 = nullptr;               // [E, H] fp32 copy of W_r (router_fp32 with a 16-bit dtype)
  float* x32 = nullptr;               // [T, H] fp32 copy of x   (same)
  float* dw32 = nullptr;              // [E, H] fp32 dW_r        (same)
  float* bias_partial = nullptr;
  void* lt = nullptr;
};

BackwardLayout carve_backward(Carver& ws, const LayerConfig& c, const CallShape& s) {
  const size_t T = static_cast<size_t>(s.num_tokens), R = static_cast<size_t>(s.plan.max_rows);
  const size_t Rr = static_cast<size_t>(s.recv_rows);
  const size_t H = static_cast<size_t>(c.hidden), K = static_cast<size_t>(c.top_k);
  const size_t E = static_cast<size_t>(c.num_experts), es = bytes_of(c.dtype);
  const bool saved_u = c.layer.recompute == 0;
  BackwardLayout l;
  if (T > 0) {
    if (c.has_shared) l.dx_shared = ws.bytes(T * H * es);
    if (c.gated_shared) l.grad_gate = ws.take<float>(T);
    l.grad_weights = ws.take<float>(T * K);
    l.grad_logits = ws.bytes(T * static_cast<size_t>(c.logits_stride) * bytes_of(c.logits_dtype));
  }
  const size_t start = ws.mark();
  if (c.has_shared) {  // T = 0 too: the shared MLP's backward writes zero weight gradients
    if (c.gated_shared && T > 0) l.grad_shared = ws.bytes(T * H * es);
    l.mlp_ws = ws.bytes(experts::mlp_backward_workspace_bytes(c.shared, s.num_tokens, saved_u));
    if (c.gated_shared)
      l.gate_partial = ws.take<float>(static_cast<size_t>(kl::column_sum_partial_floats(s.num_tokens, c.hidden)));
    ws.rewind(start);
  }
  if (c.ep != nullptr) {
    l.ep_ws = ws.bytes(c.ep_workspace_bytes);
    l.grad_partials = ws.bytes(Rr * H * es);
    l.grad_recv_x = ws.bytes(Rr * H * es);
    l.grad_recv_weights = ws.take<float>(Rr * K);
  }
  if (!saves_permuted(c)) {  // else read from the saved buffer
    l.xp = ws.bytes(R * H * es);
    l.row_weights = ws.take<float>(R);
  }
  l.grad_yp = ws.bytes(R * H * es);
  l.grad_xp = ws.bytes(R * H * es);
  l.grad_row_weights = ws.take<float>(R);
  l.experts_ws = ws.bytes(experts::backward_workspace_bytes(c.experts, s.plan.max_rows, saved_u));
  if (T == 0) return l;
  ws.rewind(start);
  l.dx_router = ws.take<float>(T * H);
  if (c.mixed_router) {
    l.w32 = ws.take<float>(E * H);
    l.x32 = ws.take<float>(T * H);
    l.dw32 = ws.take<float>(E * H);
  }
  l.bias_partial = ws.take<float>(static_cast<size_t>(kl::column_sum_partial_floats(s.num_tokens, c.num_experts)));
  l.lt = ws.bytes(kLtWorkspaceBytes);
  return l;
}

// Records the diagnostic stage events (moekit_layer_set_stage_events) when the caller set them.
class Stages {
 public:
  Stages(void* const* events, cudaStream_t stream) : events_(events), stream_(stream) {}
  moekit_status_t begin(moekit_layer_stage_t stage) { return record(2 * stage); }
  moekit_status_t end(moekit_layer_stage_t stage) { return record(2 * stage + 1); }

 private:
  moekit_status_t record(int index) {
    if (events_ == nullptr) return MOEKIT_STATUS_SUCCESS;
    MOEKIT_CUDA_TRY(cudaEventRecord(static_cast<cudaEvent_t>(events_[index]), stream_), "recording a stage event");
    return MOEKIT_STATUS_SUCCESS;
  }
  void* const* events_;
  cudaStream_t stream_;
};

tokens::MoveRequest move_request(tokens::Movement op, const LayerConfig& c) {
  tokens::MoveRequest r;
  r.op = op;
  r.hidden = c.hidden;
  r.dtype = c.dtype;
  return r;
}

// z = x W_r^T (+ b_r) into the saved logits [T, stride]. In cuBLASLt's column-major terms
// z^T [E, T] = W_r^T (W_r row-major [E, H] is column-major [H, E]: op T) times x^T [H, T].
moekit_status_t project(moekit_layer& L, int64_t T, const void* x, const moekit_layer_params_t& p, void* logits,
                        void* lt_ws, cudaStream_t stream) {
  const LayerConfig& c = L.config;
  Gemm g{};
  g.in = cuda_type(c.dtype);
  g.out = cuda_type(c.logits_dtype);
  g.op_a = CUBLAS_OP_T;
  g.op_b = CUBLAS_OP_N;
  g.m = c.num_experts;
  g.n = T;
  g.k = c.hidden;
  g.lda = c.hidden;
  g.ldb = c.hidden;
  g.ldd = c.logits_stride;
  g.a = p.router_weight;
  g.b = x;
  g.d = logits;
  // The bias epilogue with a bias of D's type; fp32 logits from 16-bit inputs add the 16-bit bias
  // in a separate pass instead (the same single fp32 addition, no rounding in between).
  g.bias = c.mixed_router ? nullptr : p.router_bias;
  MOEKIT_TRY(L.projection.run(g, lt_ws, stream));
  if (c.mixed_router && p.router_bias != nullptr)
    MOEKIT_CUDA_TRY(kl::launch_add_row_bias(T, c.num_experts, c.logits_stride, static_cast<float*>(logits), c.dtype,
                                            p.router_bias, stream),
                    "launching the router bias add");
  return MOEKIT_STATUS_SUCCESS;
}

// dW_r = dz^T x (stored [E, H] like W_r), db_r = sum_t dz_t, dx_router = dz W_r (fp32).
moekit_status_t project_backward(moekit_layer& L, int64_t T, const void* x, const moekit_layer_params_t& p,
                                 const void* grad_logits, const moekit_layer_grads_t& g, const BackwardLayout& w,
                                 cudaStream_t stream) {
  const LayerConfig& c = L.config;
  const int64_t E = c.num_experts, H = c.hidden;
  // Operands of the two GEMMs: the parameters as they are, or fp32 copies next to fp32 logits.
  const void* weight = p.router_weight;
  const void* x_operand = x;
  const cudaDataType_t in = cuda_type(c.logits_dtype);
  if (c.mixed_router) {
    MOEKIT_CUDA_TRY(kl::launch_convert(c.dtype, MOEKIT_DTYPE_F32, E * H, p.router_weight, w.w32, stream),
                    "converting the router weight to fp32");
    weight = w.w32;
  }
  // dx_router^T [H, T] = W_r^T-as-stored ([H, E] column-major, op N) times dz^T ([E, T], ld stride).
  Gemm dx{};
  dx.in = in;
  dx.out = CUDA_R_32F;
  dx.op_a = CUBLAS_OP_N;
  dx.op_b = CUBLAS_OP_N;
  dx.m = H;
  dx.n = T;
  dx.k = E;
  dx.lda = H;
  dx.ldb = c.logits_stride;
  dx.ldd = H;
  dx.a = weight;
  dx.b = grad_logits;
  dx.d = w.dx_router;
  dx.bias = nullptr;
  MOEKIT_TRY(L.projection.run(dx, w.lt, stream));
  if (g.router_weight != nullptr) {
    if (c.mixed_router) {
      MOEKIT_CUDA_TRY(kl::launch_convert(c.dtype, MOEKIT_DTYPE_F32, T * H, x, w.x32, stream),
                      "converting x to fp32 for the router weight gradient");
      x_operand = w.x32;
    }
    // dW_r^T [H, E] (= dW_r row-major [E, H]) = x^T ([H, T], op N) times dz ([E, T] ld stride, op T).
    Gemm dw{};
    dw.in = in;
    dw.out = c.mixed_router ? CUDA_R_32F : cuda_type(c.dtype);
    dw.op_a = CUBLAS_OP_N;
    dw.op_b = CUBLAS_OP_T;
    dw.m = H;
    dw.n = E;
    dw.k = T;
    dw.lda = H;
    dw.ldb = c.logits_stride;
    dw.ldd = H;
    dw.a = x_operand;
    dw.b = grad_logits;
    dw.d = c.mixed_router ? static_cast<void*>(w.dw32) : g.router_weight;
    dw.bias = nullptr;
    MOEKIT_TRY(L.projection.run(dw, w.lt, stream));
    if (c.mixed_router)
      MOEKIT_CUDA_TRY(kl::launch_convert(MOEKIT_DTYPE_F32, c.dtype, E * H, w.dw32, g.router_weight, stream),
                      "rounding the router weight gradient");
  }
  if (g.router_bias != nullptr)
    MOEKIT_CUDA_TRY(kl::launch_column_sum(c.logits_dtype, c.dtype, T, c.num_experts, grad_logits, c.logits_stride,
                                          nullptr, w.bias_partial, g.router_bias, stream),
                    "launching the router bias gradient");
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace

moekit_status_t shape_for(const LayerConfig& c, int64_t num_tokens, CallShape* shape) {
  if (c.ep == nullptr) {
    MOEKIT_TRY(tokens::plan_shape(c.plan, num_tokens, &shape->plan));
    shape->num_tokens = num_tokens;
    shape->recv_rows = 0;
    return MOEKIT_STATUS_SUCCESS;
  }
  if (num_tokens < 0 || num_tokens > c.ep_max_tokens)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                "num_tokens = %lld is outside [0, %lld] (max_tokens of config->expert_parallel)",
                static_cast<long long>(num_tokens), static_cast<long long>(c.ep_max_tokens));
  // This rank's [T, K] routing arrays must be int32-indexable too (the plan below is over other rows).
  tokens::PlanShape own;
  MOEKIT_TRY(tokens::plan_shape(c.plan, num_tokens, &own));
  // The plan runs over the received rows: its worst case is every rank's max_tokens arriving here.
  // (A handle whose worst case overflows int32 rows fails the layer's calls, not its config check.)
  if (tokens::plan_shape(c.plan, c.ep_recv_rows, &shape->plan) != MOEKIT_STATUS_SUCCESS)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                "config->expert_parallel can bring %lld rows per dispatch (max_tokens %lld from each rank), "
                "whose plan (top_k = %d) would pass INT32_MAX slots or rows",
                static_cast<long long>(c.ep_recv_rows), static_cast<long long>(c.ep_max_tokens), c.top_k);
  shape->num_tokens = num_tokens;
  shape->recv_rows = c.ep_recv_rows;
  return MOEKIT_STATUS_SUCCESS;
}

size_t saved_bytes(const LayerConfig& c, const CallShape& s) {
  WorkspaceCarver ws(nullptr);
  (void)carve_saved(ws, c, s);
  return ws.bytes();
}

size_t forward_workspace_bytes(const LayerConfig& c, const CallShape& s) {
  Carver ws(nullptr);
  (void)carve_forward(ws, c, s);
  return ws.size();
}

size_t backward_workspace_bytes(const LayerConfig& c, const CallShape& s) {
  Carver ws(nullptr);
  (void)carve_backward(ws, c, s);
  return ws.size();
}

void saved_view(const LayerConfig& c, const CallShape& s, void* saved, moekit_layer_saved_view_t* v) {
  const SavedLayout l = saved_layout(c, s, saved);
  v->max_rows = s.plan.max_rows;
  v->logits_row_stride = c.logits_stride;
  v->logits_dtype = c.logits_dtype;
  v->logits = l.logits;
  v->weights = l.weights;
  v->indices = l.indices;
  v->expert_load = l.load;
  v->aux_score_sum = l.score_sum;
  v->aux_token_count = l.count;
  v->expert_counts = l.plan.expert_counts;
  v->expert_offsets = l.plan.expert_offsets;
  v->row_of_slot = l.plan.row_of_slot;
  v->slot_of_row = l.plan.slot_of_row;
  v->plan_totals = l.plan.totals;
  v->expert_u = l.expert_u;
  v->shared_u = l.shared_u;
  v->shared_gate_logit = l.gate_logit;
  v->shared_out = l.shared_out;
  v->recv_rows = s.recv_rows;
  v->ep_layout = l.ep_layout;
  v->recv_x = l.recv_x;
  v->recv_indices = l.recv_indices;
  v->recv_weights = l.recv_weights;
  v->recv_mask = l.recv_mask;
  v->ep_dropped = l.ep_dropped;
  v->expert_xp = l.xp;
  v->expert_row_weights = l.row_weights;
}

ParamSizes param_sizes(const LayerConfig& c) {
  const uint64_t E = static_cast<uint64_t>(c.num_experts), H = static_cast<uint64_t>(c.hidden);
  const uint64_t El = static_cast<uint64_t>(c.local_experts);  // the expert weights held here
  const uint64_t I = static_cast<uint64_t>(c.experts.inter), NU = static_cast<uint64_t>(c.expert_nu);
  const uint64_t Is = static_cast<uint64_t>(c.shared_inter), NUs = static_cast<uint64_t>(c.shared_nu);
  const uint64_t es = bytes_of(c.dtype);
  const bool eb = c.layer.expert_bias != 0, sb = c.layer.shared_bias != 0;
  ParamSizes s;
  s.router_weight = E * H * es;
  s.router_bias = c.layer.router_bias ? E * es : 0;
  s.correction_bias = 4 * E;
  s.w_gate_up = El * H * NU * es;
  s.b_gate_up = eb ? El * NU * es : 0;
  s.w_down = El * I * H * es;
  s.b_down = eb ? El * H * es : 0;
  s.shared_w_gate_up = c.has_shared ? H * NUs * es : 0;
  s.shared_b_gate_up = sb ? NUs * es : 0;
  s.shared_w_down = c.has_shared ? Is * H * es : 0;
  s.shared_b_down = sb ? H * es : 0;
  s.shared_gate_weight = c.gated_shared ? H * es : 0;
  return s;
}

moekit_status_t create(const LayerConfig& config, moekit_layer_t* out) {
  auto* layer = new (std::nothrow) moekit_layer();
  if (layer == nullptr) return fail(MOEKIT_STATUS_OUT_OF_MEMORY, "allocating the layer failed");
  struct Guard {
    moekit_layer* layer;
    ~Guard() {
      if (layer) (void)destroy(layer);
    }
  } guard{layer};
  layer->config = config;
  MOEKIT_CUDA_TRY(cudaGetDevice(&layer->device), "querying the current device");
  MOEKIT_TRY(experts::check_device(config.experts));
  MOEKIT_TRY(layer->projection.create());
  if (config.has_shared) MOEKIT_TRY(experts::mlp_handle_create(&layer->shared));
  *out = layer;
  guard.layer = nullptr;
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t destroy(moekit_layer_t layer) {
  if (layer == nullptr) return MOEKIT_STATUS_SUCCESS;
  const moekit_status_t status = experts::mlp_handle_destroy(layer->shared);
  delete layer;  // the projection's cuBLASLt state goes with it
  return status;
}

namespace {

// The plan of this call's routed rows: the worst-case shape, or in exact expert-parallel mode the
// rows this layout brought (host_layout's receive counts).
moekit_status_t routed_shape(const LayerConfig& c, const CallShape& shape, const int64_t* host_layout,
                             tokens::PlanShape* out) {
  if (c.ep == nullptr || !c.ep_exact) {
    *out = shape.plan;
    return MOEKIT_STATUS_SUCCESS;
  }
  const int64_t rows = ep::row_spaces(c.ep->dims, host_layout).recv_rows;
  return tokens::plan_shape(c.plan, rows, out);
}

// xp, p = the rows of tokens_in (x, or the received rows) in the plan's expert-major order, with
// each row's routing weight from token_weights [tokens, K].
moekit_status_t permute_rows(const LayerConfig& c, const tokens::PlanShape& rows, const moekit_token_plan_t& plan,
                             const void* tokens_in, const float* token_weights, void* xp, float* row_weights,
                             cudaStream_t stream) {
  tokens::MoveRequest permute = move_request(tokens::Movement::kPermute, c);
  permute.token_in = tokens_in;
  permute.token_in_stride = c.hidden;
  permute.rows_out = xp;
  permute.weights = token_weights;
  permute.row_weights = row_weights;
  return tokens::run_move(rows, plan, permute, stream);
}

// xp, p = permute(tokens_in) with the plan over `rows`, then the experts: yp. tokens_in is x, or
// with expert parallelism the received rows (their weights alongside).
moekit_status_t permute_and_experts(moekit_layer& L, const tokens::PlanShape& rows, const ForwardCall& a,
                                    const SavedLayout& s, const ForwardLayout& w, const void* tokens_in,
                                    const float* token_weights, Stages& stages) {
  const LayerConfig& c = L.config;
  const moekit_layer_params_t& p = a.params;
  void* const xp = s.xp ? s.xp : w.xp;  // kept for the backward when saves_permuted
  float* const row_weights = s.xp ? s.row_weights : w.row_weights;
  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_PERMUTE));
  MOEKIT_TRY(permute_rows(c, rows, s.plan, tokens_in, token_weights, xp, row_weights, a.stream));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_PERMUTE));

  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_EXPERTS));
  const experts::ForwardArgs ea{rows.max_rows, s.plan.expert_offsets, xp,       row_weights, p.w_gate_up,
                                p.b_gate_up,   p.w_down,              p.b_down, s.expert_u,  w.yp};
  MOEKIT_TRY(experts::forward(c.experts, ea, w.experts_ws, a.stream));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_EXPERTS));
  return MOEKIT_STATUS_SUCCESS;
}

// out = the unweighted sum of each plan token's rows of yp (the weight was applied inside the expert).
moekit_status_t combine_rows(const LayerConfig& c, const tokens::PlanShape& rows, const SavedLayout& s,
                             const ForwardLayout& w, void* out, cudaStream_t stream) {
  tokens::MoveRequest combine = move_request(tokens::Movement::kCombine, c);
  combine.rows_in = w.yp;
  combine.weights = nullptr;
  combine.token_out = out;
  combine.token_out_stride = c.hidden;
  return tokens::run_move(rows, s.plan, combine, stream);
}

// Exact mode's host layouts, kept per saved buffer (moekit_layer::host_layouts): the entry of
// `saved`, created if needed and made the most recently used; the least recently used is dropped
// when the map is full.
std::vector<int64_t>& keep_host_layout(moekit_layer& L, const void* saved) {
  auto found = L.host_layouts.find(saved);
  if (found != L.host_layouts.end()) {
    L.host_layout_order.erase(std::find(L.host_layout_order.begin(), L.host_layout_order.end(), saved));
  } else {
    if (L.host_layouts.size() >= moekit_layer::kMaxHostLayouts) {
      L.host_layouts.erase(L.host_layout_order.front());
      L.host_layout_order.pop_front();
    }
    found = L.host_layouts.emplace(saved, std::vector<int64_t>()).first;
  }
  L.host_layout_order.push_back(saved);
  return found->second;
}

void forget_host_layout(moekit_layer& L, const void* saved) {
  if (L.host_layouts.erase(saved) != 0)
    L.host_layout_order.erase(std::find(L.host_layout_order.begin(), L.host_layout_order.end(), saved));
}

moekit_status_t forward_routed_ep_steps(moekit_layer& L, const CallShape& shape, const ForwardCall& a,
                                        const SavedLayout& s, const ForwardLayout& w, int64_t* host_layout,
                                        Stages& stages);

// Expert parallelism, forward of the routed part: layout (exact mode: the count exchange and its one
// host read), dispatch, the plan of the received rows over this rank's experts, permute, experts,
// the unweighted local combine into one partial row per received row, and the EP combine into y.
moekit_status_t forward_routed_ep(moekit_layer& L, const CallShape& shape, const ForwardCall& a,
                                  const SavedLayout& s, const ForwardLayout& w, Stages& stages) {
  const LayerConfig& c = L.config;
  int64_t* host_layout = nullptr;
  if (c.ep_exact) {
    std::vector<int64_t>& kept = keep_host_layout(L, a.saved);
    kept.assign(c.ep_host_layout_count, 0);
    host_layout = kept.data();
  }
  return forward_routed_ep_steps(L, shape, a, s, w, host_layout, stages);  // forward() forgets it on failure
}

moekit_status_t forward_routed_ep_steps(moekit_layer& L, const CallShape& shape, const ForwardCall& a,
                                        const SavedLayout& s, const ForwardLayout& w, int64_t* host_layout,
                                        Stages& stages) {
  const LayerConfig& c = L.config;
  moekit_ep& h = *c.ep;
  const int64_t T = a.num_tokens;
  const cudaStream_t stream = a.stream;
  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_PLAN));
  int64_t received = 0;
  MOEKIT_TRY(ep::layout(h, T, s.indices, a.token_mask, s.ep_layout, host_layout, &received, s.ep_dropped, stream));
  tokens::PlanShape rows;
  MOEKIT_TRY(routed_shape(c, shape, host_layout, &rows));
  MOEKIT_TRY(ep::dispatch(h, T, s.ep_layout, host_layout, a.x, s.indices, s.weights, s.recv_x, s.recv_indices,
                          s.recv_weights, nullptr, s.recv_mask, w.ep_ws, stream));
  // Gap rows of capacity mode are masked out; ids of other ranks' experts make no row here.
  MOEKIT_TRY(tokens::build_plan(rows, s.recv_indices, s.recv_weights, s.recv_mask, s.plan, w.plan_ws, stream));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_PLAN));

  if (rows.num_tokens > 0) MOEKIT_TRY(permute_and_experts(L, rows, a, s, w, s.recv_x, s.recv_weights, stages));

  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_COMBINE));
  if (rows.num_tokens > 0) MOEKIT_TRY(combine_rows(c, rows, s, w, w.partials, stream));
  MOEKIT_TRY(ep::combine(h, T, s.ep_layout, host_layout, w.partials, a.y, w.ep_ws, stream));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_COMBINE));
  return MOEKIT_STATUS_SUCCESS;
}

// Without expert parallelism: permute, experts and combine on this GPU (T > 0).
moekit_status_t forward_routed_local(moekit_layer& L, const CallShape& shape, const ForwardCall& a,
                                     const SavedLayout& s, const ForwardLayout& w, Stages& stages) {
  MOEKIT_TRY(permute_and_experts(L, shape.plan, a, s, w, a.x, s.weights, stages));
  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_COMBINE));
  MOEKIT_TRY(combine_rows(L.config, shape.plan, s, w, a.y, a.stream));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_COMBINE));
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace

namespace {
moekit_status_t forward_steps(moekit_layer& L, const CallShape& shape, const ForwardCall& a);
}  // namespace

// Exact expert-parallel mode: whatever this saved buffer held before, its old host layout must not
// outlive this forward; a successful forward keeps the new one (forward_routed_ep).
moekit_status_t forward(moekit_layer& L, const CallShape& shape, const ForwardCall& a) {
  const bool exact = L.config.ep != nullptr && L.config.ep_exact;
  if (exact) forget_host_layout(L, a.saved);
  const moekit_status_t status = forward_steps(L, shape, a);
  if (status != MOEKIT_STATUS_SUCCESS && exact) forget_host_layout(L, a.saved);
  return status;
}

namespace {

moekit_status_t forward_steps(moekit_layer& L, const CallShape& shape, const ForwardCall& a) {
  const LayerConfig& c = L.config;
  const moekit_layer_params_t& p = a.params;
  const int64_t T = a.num_tokens;
  const cudaStream_t stream = a.stream;
  const SavedLayout s = saved_layout(c, shape, a.saved);
  Carver carver(a.workspace);
  const ForwardLayout w = carve_forward(carver, c, shape);
  Stages stages(L.stage_events.load(std::memory_order_acquire), stream);

  if (T > 0) {
    MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_PROJECTION));
    MOEKIT_TRY(project(L, T, a.x, p, s.logits, w.lt, stream));
    MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_PROJECTION));
  }

  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_ROUTER));
  router::ForwardCall rc{};
  rc.config = internal_router(c);
  rc.num_tokens = T;
  rc.dtype = c.logits_dtype;
  rc.logits = s.logits;
  rc.logits_row_stride = c.logits_stride;
  rc.bias = p.correction_bias;
  rc.token_mask = a.token_mask;
  rc.weights = s.weights;
  rc.indices = s.indices;
  rc.expert_load = s.load;
  rc.aux_score_sum = s.score_sum;
  rc.aux_token_count = s.count;
  rc.workspace = w.router_ws;
  rc.stream = stream;
  MOEKIT_TRY(router::run_forward(rc));
  if (c.ep_global_statistics) {  // the global batch's load and statistics, on every rank alike
    MOEKIT_TRY(ep::allreduce_expert_load(c.ep->comm, c.num_experts, s.load, stream));
    MOEKIT_TRY(ep::allreduce_aux_stats(c.ep->comm, c.ep->dims.num_ranks, c.num_experts, s.score_sum, s.count,
                                       w.stats_ws, stream));
  }
  if (a.expert_load != nullptr) {
    if (c.router.accumulate_load) {
      MOEKIT_CUDA_TRY(kl::launch_add_int32(c.num_experts, s.load, a.expert_load, stream),
                      "launching the expert-load accumulation");
    } else {
      MOEKIT_CUDA_TRY(cudaMemcpyAsync(a.expert_load, s.load, sizeof(int32_t) * c.num_experts,
                                      cudaMemcpyDeviceToDevice, stream),
                      "copying the expert load");
    }
  }
  if (a.aux_loss != nullptr)
    MOEKIT_TRY(router::run_aux_loss(c.num_experts, c.top_k, s.load, s.score_sum, s.count, a.aux_loss, stream));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_ROUTER));

  if (c.ep != nullptr) {
    MOEKIT_TRY(forward_routed_ep(L, shape, a, s, w, stages));
  } else {
    MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_PLAN));
    MOEKIT_TRY(tokens::build_plan(shape.plan, s.indices, s.weights, a.token_mask, s.plan, w.plan_ws, stream));
    MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_PLAN));
    if (T > 0) MOEKIT_TRY(forward_routed_local(L, shape, a, s, w, stages));
  }

  if (c.has_shared && T > 0) {
    MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_SHARED));
    void* shared_out = c.gated_shared ? s.shared_out : w.shared_out;
    const experts::MlpForwardArgs ma{T,        a.x,      p.shared_w_gate_up, p.shared_b_gate_up, p.shared_w_down,
                                     p.shared_b_down, s.shared_u, shared_out};
    MOEKIT_TRY(experts::mlp_forward(L.shared, c.shared, ma, w.mlp_ws, stream));
    MOEKIT_CUDA_TRY(kl::launch_shared_add(c.dtype, T, c.hidden, a.x, c.gated_shared ? p.shared_gate_weight : nullptr,
                                          shared_out, a.y, s.gate_logit, stream),
                    "launching the shared-expert add");
    MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_SHARED));
  }
  return MOEKIT_STATUS_SUCCESS;
}

// The collectives that wrap the routed backward with expert parallelism: dy to the rows' ranks
// before the local combine backward, dx and the weight gradients back after the local permute
// backward. Empty without expert parallelism.
// (Plain data, no std::function: nothing is allocated per call.)
struct EpBackwardSteps {
  moekit_ep* h = nullptr;  // NULL: no expert parallelism, both steps do nothing
  const void* layout = nullptr;
  const int64_t* host_layout = nullptr;
  const int32_t* indices = nullptr;
  void* ep_ws = nullptr;
  moekit_status_t before_combine_backward(const BackwardCall& a, const BackwardLayout& w) const {
    if (h == nullptr) return MOEKIT_STATUS_SUCCESS;
    return ep::combine_backward(*h, a.num_tokens, layout, host_layout, a.grad_y, w.grad_partials, ep_ws, a.stream);
  }
  moekit_status_t after_permute_backward(const BackwardCall& a, const BackwardLayout& w) const {
    if (h == nullptr) return MOEKIT_STATUS_SUCCESS;
    return ep::dispatch_backward(*h, a.num_tokens, layout, host_layout, indices, w.grad_recv_x, w.grad_recv_weights,
                                 a.grad_x, w.grad_weights, ep_ws, a.stream);
  }
};

// The routed experts' backward over a plan of `rows`: xp and p again (from x, or from the received
// rows), dy into rows (grad_rows_in: dy, or dy at the received rows), the experts, and back to one
// gradient row per plan token (grad_tokens_out) with the weight gradients per slot. The EP steps
// run inside the COMBINE_BACKWARD and PERMUTE_BACKWARD stages, also when no row came (they are
// collectives every rank issues).
moekit_status_t backward_routed(moekit_layer& L, const tokens::PlanShape& rows, const BackwardCall& a,
                                const SavedLayout& s, const BackwardLayout& w, const void* tokens_in,
                                const float* token_weights, const void* grad_rows_in, void* grad_tokens_out,
                                float* grad_weights_out, const EpBackwardSteps& ep_steps, Stages& stages) {
  const LayerConfig& c = L.config;
  const moekit_layer_params_t& p = a.params;
  const moekit_layer_grads_t& g = a.grads;
  const cudaStream_t stream = a.stream;
  if (rows.num_tokens == 0) {  // no rows: every requested expert weight gradient is zero
    MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_COMBINE_BACKWARD));
    MOEKIT_TRY(ep_steps.before_combine_backward(a, w));
    MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_COMBINE_BACKWARD));
    MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_EXPERTS_BACKWARD));
    const experts::BackwardArgs eb{0,       s.plan.expert_offsets, nullptr,  nullptr,      p.w_gate_up, p.b_gate_up,
                                   p.w_down, p.b_down,             nullptr,  nullptr,      nullptr,     g.w_gate_up,
                                   g.b_gate_up, g.w_down,          g.b_down, nullptr};
    MOEKIT_TRY(experts::backward(c.experts, eb, w.experts_ws, stream));
    MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_EXPERTS_BACKWARD));
    MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_PERMUTE_BACKWARD));
    MOEKIT_TRY(ep_steps.after_permute_backward(a, w));
    return stages.end(MOEKIT_LAYER_STAGE_PERMUTE_BACKWARD);
  }
  // xp and p: the forward's (saved), or permuted again; the stage is recorded either way (an
  // empty interval when saved).
  const void* const xp = s.xp ? s.xp : w.xp;
  const float* const row_weights = s.xp ? s.row_weights : w.row_weights;
  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_PERMUTE_RECOMPUTE));
  if (s.xp == nullptr)
    MOEKIT_TRY(permute_rows(c, rows, s.plan, tokens_in, token_weights, w.xp, w.row_weights, stream));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_PERMUTE_RECOMPUTE));

  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_COMBINE_BACKWARD));
  MOEKIT_TRY(ep_steps.before_combine_backward(a, w));
  tokens::MoveRequest combine_bwd = move_request(tokens::Movement::kCombineBackward, c);
  combine_bwd.token_in = grad_rows_in;
  combine_bwd.token_in_stride = c.hidden;
  combine_bwd.weights = nullptr;  // unweighted combine: dyp[row(t, k)] = dy[t]
  combine_bwd.rows_out = w.grad_yp;
  MOEKIT_TRY(tokens::run_move(rows, s.plan, combine_bwd, stream));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_COMBINE_BACKWARD));

  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_EXPERTS_BACKWARD));
  const experts::BackwardArgs eb{rows.max_rows, s.plan.expert_offsets, xp,          row_weights,   p.w_gate_up,
                                 p.b_gate_up,   p.w_down,              p.b_down,    s.expert_u,    w.grad_yp,
                                 w.grad_xp,     g.w_gate_up,           g.b_gate_up, g.w_down,      g.b_down,
                                 w.grad_row_weights};
  MOEKIT_TRY(experts::backward(c.experts, eb, w.experts_ws, stream));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_EXPERTS_BACKWARD));

  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_PERMUTE_BACKWARD));
  tokens::MoveRequest permute_bwd = move_request(tokens::Movement::kPermuteBackward, c);
  permute_bwd.rows_in = w.grad_xp;
  permute_bwd.grad_row_weights = w.grad_row_weights;
  permute_bwd.token_out = grad_tokens_out;
  permute_bwd.token_out_stride = c.hidden;
  permute_bwd.grad_weights = grad_weights_out;
  MOEKIT_TRY(tokens::run_move(rows, s.plan, permute_bwd, stream));
  MOEKIT_TRY(ep_steps.after_permute_backward(a, w));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_PERMUTE_BACKWARD));
  return MOEKIT_STATUS_SUCCESS;
}

// A rank without tokens: zero router and shared-gate gradients, and the shared MLP's zero weight
// gradients (the routed experts' come from the rows they served).
moekit_status_t zero_token_gradients(moekit_layer& L, const BackwardCall& a, const BackwardLayout& w) {
  const LayerConfig& c = L.config;
  const moekit_layer_params_t& p = a.params;
  const moekit_layer_grads_t& g = a.grads;
  const cudaStream_t stream = a.stream;
  const uint64_t E = static_cast<uint64_t>(c.num_experts), H = static_cast<uint64_t>(c.hidden);
  const size_t es = bytes_of(c.dtype);
  if (g.router_weight)
    MOEKIT_CUDA_TRY(cudaMemsetAsync(g.router_weight, 0, E * H * es, stream), "zeroing the router weight gradient");
  if (g.router_bias)
    MOEKIT_CUDA_TRY(cudaMemsetAsync(g.router_bias, 0, E * es, stream), "zeroing the router bias gradient");
  if (g.shared_gate_weight)
    MOEKIT_CUDA_TRY(cudaMemsetAsync(g.shared_gate_weight, 0, H * es, stream), "zeroing the shared gate gradient");
  if (c.has_shared) {
    const experts::MlpBackwardArgs mb{0,       nullptr, p.shared_w_gate_up, p.shared_b_gate_up, p.shared_w_down,
                                      p.shared_b_down, nullptr, nullptr, nullptr, g.shared_w_gate_up,
                                      g.shared_b_gate_up, g.shared_w_down, g.shared_b_down};
    MOEKIT_TRY(experts::mlp_backward(L.shared, c.shared, mb, w.mlp_ws, stream));
  }
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace

moekit_status_t backward(moekit_layer& L, const CallShape& shape, const BackwardCall& a) {
  const LayerConfig& c = L.config;
  const moekit_layer_params_t& p = a.params;
  const moekit_layer_grads_t& g = a.grads;
  const int64_t T = a.num_tokens;
  const cudaStream_t stream = a.stream;
  const SavedLayout s = saved_layout(c, shape, a.saved);
  Carver carver(a.workspace);
  const BackwardLayout w = carve_backward(carver, c, shape);
  Stages stages(L.stage_events.load(std::memory_order_acquire), stream);

  // Exact expert-parallel mode: the counts of this saved buffer's forward (found before anything is
  // enqueued, so a refused call writes nothing).
  const int64_t* host_layout = nullptr;
  if (c.ep != nullptr && c.ep_exact) {
    if (L.host_layouts.find(a.saved) == L.host_layouts.end())
      return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                  "saved = %p was not written by a successful forward of this layer (in exact expert-parallel "
                  "mode the layer keeps the exchanged counts of the %zu most recently used saved buffers for "
                  "their backwards)",
                  a.saved, moekit_layer::kMaxHostLayouts);
    host_layout = keep_host_layout(L, a.saved).data();
    // The saved pieces' places depend on T: a backward with another T than its forward would read
    // them elsewhere.
    if (ep::check_host_layout(c.ep->dims, c.ep->signature, c.ep->rank, T, host_layout) != MOEKIT_STATUS_SUCCESS)
      return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                  "num_tokens = %lld differs from the forward that wrote saved = %p (its layout is for %lld tokens)",
                  static_cast<long long>(T), a.saved, static_cast<long long>(host_layout[ep::kHlNumTokens]));
  }
  tokens::PlanShape rows;
  MOEKIT_TRY(routed_shape(c, shape, host_layout, &rows));

  // Shared expert: its gate, the MLP, the gate weight.
  if (c.has_shared && T > 0) {
    MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_SHARED_BACKWARD));
    const void* grad_shared = a.grad_y;
    if (c.gated_shared) {
      MOEKIT_CUDA_TRY(kl::launch_shared_gate_backward(c.dtype, T, c.hidden, a.grad_y, s.shared_out, s.gate_logit,
                                                      w.grad_shared, w.grad_gate, stream),
                      "launching the shared-gate backward");
      grad_shared = w.grad_shared;
    }
    const experts::MlpBackwardArgs mb{T,
                                      a.x,
                                      p.shared_w_gate_up,
                                      p.shared_b_gate_up,
                                      p.shared_w_down,
                                      p.shared_b_down,
                                      s.shared_u,
                                      grad_shared,
                                      w.dx_shared,
                                      g.shared_w_gate_up,
                                      g.shared_b_gate_up,
                                      g.shared_w_down,
                                      g.shared_b_down};
    MOEKIT_TRY(experts::mlp_backward(L.shared, c.shared, mb, w.mlp_ws, stream));
    if (c.gated_shared && g.shared_gate_weight != nullptr)
      MOEKIT_CUDA_TRY(kl::launch_column_sum(c.dtype, c.dtype, T, c.hidden, a.x, c.hidden, w.grad_gate,
                                            w.gate_partial, g.shared_gate_weight, stream),
                      "launching the shared gate weight gradient");
    MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_SHARED_BACKWARD));
  }

  // Routed experts. With expert parallelism dy goes to the rows' ranks (combine's backward), the
  // experts run over the received rows, and dx and the weight gradients come back (dispatch's).
  if (c.ep != nullptr) {
    EpBackwardSteps steps;
    steps.h = c.ep;
    steps.layout = s.ep_layout;
    steps.host_layout = host_layout;
    steps.indices = s.indices;
    steps.ep_ws = w.ep_ws;
    MOEKIT_TRY(backward_routed(L, rows, a, s, w, s.recv_x, s.recv_weights, w.grad_partials, w.grad_recv_x,
                               w.grad_recv_weights, steps, stages));
  } else {
    MOEKIT_TRY(backward_routed(L, rows, a, s, w, a.x, s.weights, a.grad_y, a.grad_x, w.grad_weights,
                               EpBackwardSteps{}, stages));
  }
  if (T == 0) return zero_token_gradients(L, a, w);

  // Router, then the projection and the sum of the four dx terms.
  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_ROUTER_BACKWARD));
  router::BackwardCall rb{};
  rb.config = internal_router(c);
  rb.num_tokens = T;
  rb.dtype = c.logits_dtype;
  rb.logits = s.logits;
  rb.logits_row_stride = c.logits_stride;
  rb.bias = p.correction_bias;
  rb.token_mask = a.token_mask;
  rb.indices = s.indices;
  rb.grad_weights = w.grad_weights;
  rb.aux_loss_coeff = a.aux_loss_coeff;
  rb.expert_load = s.load;
  rb.aux_token_count = s.count;
  rb.grad_logits = w.grad_logits;
  rb.grad_logits_row_stride = c.logits_stride;
  rb.stream = stream;
  MOEKIT_TRY(router::run_backward(rb));
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_ROUTER_BACKWARD));

  MOEKIT_TRY(stages.begin(MOEKIT_LAYER_STAGE_PROJECTION_BACKWARD));
  MOEKIT_TRY(project_backward(L, T, a.x, p, w.grad_logits, g, w, stream));
  MOEKIT_CUDA_TRY(kl::launch_dx_sum(c.dtype, T, c.hidden, a.grad_x, w.dx_shared, w.grad_gate,
                                    c.gated_shared ? p.shared_gate_weight : nullptr, w.dx_router, stream),
                  "launching the sum into grad_x");
  MOEKIT_TRY(stages.end(MOEKIT_LAYER_STAGE_PROJECTION_BACKWARD));
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace moekit::layer
