// One layer problem on the device, shared by the layer GPU suite and the demo's reference check:
// device copies of the inputs, the outputs and gradients, the saved buffer and the workspaces, and
// the layer handle. Every upload, poison and download is stream-ordered on the problem's stream
// (cudaMemcpyAsync / cudaMemsetAsync), never on the legacy default stream, so the library's work on
// that stream is ordered with the harness's without device-wide synchronisation. Errors throw
// std::runtime_error (no test framework here).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "moekit/moekit.h"
#include "tests/layer/layer_cases.hpp"
#include "tests/reference/layer_ref.hpp"
#include "tests/support/numeric.hpp"

namespace moekit::test::layer {

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

inline void moekit_check(moekit_status_t s, const char* what) {
  if (s != MOEKIT_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + moekit_status_string(s) + ": " + moekit_get_last_error());
}

// Device memory whose transfers and fills go on a given stream.
class DevBuf {
 public:
  DevBuf() = default;
  explicit DevBuf(size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0) cuda_check(cudaMalloc(&ptr_, bytes_), "cudaMalloc");
  }
  ~DevBuf() {
    if (ptr_) cudaFree(ptr_);
  }
  DevBuf(DevBuf&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DevBuf& operator=(DevBuf&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;

  void* get() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

  void upload(const void* host, size_t n, cudaStream_t s) {
    if (n > bytes_) throw std::runtime_error("upload larger than the buffer");
    if (n > 0) cuda_check(cudaMemcpyAsync(ptr_, host, n, cudaMemcpyHostToDevice, s), "upload");
  }
  template <class T>
  static DevBuf from(const std::vector<T>& host, cudaStream_t s) {
    DevBuf b(host.size() * sizeof(T));
    b.upload(host.data(), b.bytes_, s);
    return b;
  }
  void fill(int byte, cudaStream_t s) const {
    if (ptr_) cuda_check(cudaMemsetAsync(ptr_, byte, bytes_, s), "fill");
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Bytes at a device address, after everything enqueued on the stream so far.
inline std::vector<uint8_t> download(const void* ptr, size_t n, cudaStream_t s) {
  std::vector<uint8_t> host(n);
  if (n > 0) {
    cuda_check(cudaMemcpyAsync(host.data(), ptr, n, cudaMemcpyDeviceToHost, s), "download");
    cuda_check(cudaStreamSynchronize(s), "download sync");
  }
  return host;
}

inline std::vector<uint8_t> download(const DevBuf& b, cudaStream_t s) { return download(b.get(), b.bytes(), s); }

template <class T>
std::vector<T> download_as(const void* ptr, size_t count, cudaStream_t s) {
  const std::vector<uint8_t> bytes = download(ptr, count * sizeof(T), s);
  std::vector<T> v(count);
  if (count > 0) std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

inline std::vector<uint8_t> pack_d(moekit_dtype_t dtype, const std::vector<double>& v) {
  return pack(dtype, std::vector<float>(v.begin(), v.end()));
}

// A dtype tensor of the device as doubles.
inline std::vector<double> download_values(const void* ptr, size_t count, moekit_dtype_t dtype, cudaStream_t s) {
  const std::vector<float> f = unpack(dtype, download(ptr, count * moekit_dtype_size(dtype), s));
  return std::vector<double>(f.begin(), f.end());
}

// The parameter buffers, named as in moekit_layer_params_t (empty where the layer has none).
struct ParamBuffers {
  DevBuf router_weight, router_bias, correction_bias, w_gate_up, b_gate_up, w_down, b_down, shared_w_gate_up,
      shared_b_gate_up, shared_w_down, shared_b_down, shared_gate_weight;

  moekit_layer_params_t pointers() const {
    moekit_layer_params_t p;
    moekit_layer_params_init(&p, sizeof(p));
    p.router_weight = router_weight.get();
    p.router_bias = router_bias.get();
    p.correction_bias = correction_bias.as<float>();
    p.w_gate_up = w_gate_up.get();
    p.b_gate_up = b_gate_up.get();
    p.w_down = w_down.get();
    p.b_down = b_down.get();
    p.shared_w_gate_up = shared_w_gate_up.get();
    p.shared_b_gate_up = shared_b_gate_up.get();
    p.shared_w_down = shared_w_down.get();
    p.shared_b_down = shared_b_down.get();
    p.shared_gate_weight = shared_gate_weight.get();
    return p;
  }
};

// The gradient buffers, named as in moekit_layer_grads_t.
struct GradBuffers {
  DevBuf router_weight, router_bias, w_gate_up, b_gate_up, w_down, b_down, shared_w_gate_up, shared_b_gate_up,
      shared_w_down, shared_b_down, shared_gate_weight;

  // One gradient per parameter of `p`, of its size (none where the layer has no such parameter).
  static GradBuffers like(const ParamBuffers& p) {
    GradBuffers g;
    g.router_weight = DevBuf(p.router_weight.bytes());
    g.router_bias = DevBuf(p.router_bias.bytes());
    g.w_gate_up = DevBuf(p.w_gate_up.bytes());
    g.b_gate_up = DevBuf(p.b_gate_up.bytes());
    g.w_down = DevBuf(p.w_down.bytes());
    g.b_down = DevBuf(p.b_down.bytes());
    g.shared_w_gate_up = DevBuf(p.shared_w_gate_up.bytes());
    g.shared_b_gate_up = DevBuf(p.shared_b_gate_up.bytes());
    g.shared_w_down = DevBuf(p.shared_w_down.bytes());
    g.shared_b_down = DevBuf(p.shared_b_down.bytes());
    g.shared_gate_weight = DevBuf(p.shared_gate_weight.bytes());
    return g;
  }

  std::vector<const DevBuf*> all() const {
    return {&router_weight, &router_bias, &w_gate_up, &b_gate_up, &w_down, &b_down, &shared_w_gate_up,
            &shared_b_gate_up, &shared_w_down, &shared_b_down, &shared_gate_weight};
  }

  moekit_layer_grads_t pointers() const {
    moekit_layer_grads_t g;
    moekit_layer_grads_init(&g, sizeof(g));
    g.router_weight = router_weight.get();
    g.router_bias = router_bias.get();
    g.w_gate_up = w_gate_up.get();
    g.b_gate_up = b_gate_up.get();
    g.w_down = w_down.get();
    g.b_down = b_down.get();
    g.shared_w_gate_up = shared_w_gate_up.get();
    g.shared_b_gate_up = shared_b_gate_up.get();
    g.shared_w_down = shared_w_down.get();
    g.shared_b_down = shared_b_down.get();
    g.shared_gate_weight = shared_gate_weight.get();
    return g;
  }
};

class DeviceProblem {
 public:
  // Uploads `problem` (and dy) for the layer `lcase` on `stream` and creates the layer.
  DeviceProblem(const LayerCase& lcase, const ref::LayerProblem& problem, const std::vector<double>& grad_y,
                cudaStream_t stream)
      : lcase_(lcase), stream_(stream), T_(problem.num_tokens) {
    config_ = lcase_.config();
    moekit_check(moekit_layer_create(&config_, &layer_), "moekit_layer_create");
    moekit_check(moekit_layer_saved_size(&config_, T_, &saved_bytes_), "moekit_layer_saved_size");
    moekit_check(moekit_layer_workspace_size(&config_, T_, &forward_bytes_, &backward_bytes_),
                 "moekit_layer_workspace_size");
    const moekit_dtype_t d = lcase_.dtype;
    const size_t es = moekit_dtype_size(d), H = lcase_.hidden, E = lcase_.num_experts();
    const size_t TH = static_cast<size_t>(T_) * H;
    x_ = upload_values(problem.x);
    if (!problem.mask.empty()) mask_ = DevBuf::from(problem.mask, stream_);
    y_ = DevBuf(TH * es);
    dy_ = upload_values(grad_y);
    dx_ = DevBuf(TH * es);
    load_ = DevBuf(E * sizeof(int32_t));
    aux_ = DevBuf(sizeof(float));
    saved_ = DevBuf(saved_bytes_);
    forward_ws_ = DevBuf(forward_bytes_);
    backward_ws_ = DevBuf(backward_bytes_);
    p_.router_weight = upload_values(problem.router_weight);
    p_.router_bias = upload_values(problem.router_bias);
    if (!problem.correction_bias.empty()) p_.correction_bias = DevBuf::from(problem.correction_bias, stream_);
    p_.w_gate_up = upload_values(problem.w_gate_up);
    p_.b_gate_up = upload_values(problem.b_gate_up);
    p_.w_down = upload_values(problem.w_down);
    p_.b_down = upload_values(problem.b_down);
    p_.shared_w_gate_up = upload_values(problem.shared_w_gate_up);
    p_.shared_b_gate_up = upload_values(problem.shared_b_gate_up);
    p_.shared_w_down = upload_values(problem.shared_w_down);
    p_.shared_b_down = upload_values(problem.shared_b_down);
    p_.shared_gate_weight = upload_values(problem.shared_gate_weight);
    params_ = p_.pointers();
    grads_ = GradBuffers::like(p_);
    grad_ptrs_ = grads_.pointers();
    cuda_check(cudaStreamSynchronize(stream_), "uploading the problem");
  }
  ~DeviceProblem() {
    if (layer_) moekit_layer_destroy(layer_);
  }
  DeviceProblem(const DeviceProblem&) = delete;
  DeviceProblem& operator=(const DeviceProblem&) = delete;

  // Enqueue one call (no synchronisation).
  moekit_status_t forward(int32_t* expert_load_override = nullptr) {
    return moekit_layer_forward(layer_, T_, x_.get(), mask_.as<uint8_t>(), &params_, y_.get(),
                                expert_load_override ? expert_load_override : load_.as<int32_t>(), aux_.as<float>(),
                                saved_.get(), saved_.bytes(), forward_ws_.get(), forward_ws_.bytes(), stream_);
  }
  moekit_status_t backward() {
    return moekit_layer_backward(layer_, T_, x_.get(), mask_.as<uint8_t>(), &params_, saved_.get(), saved_.bytes(),
                                 dy_.get(), static_cast<float>(lcase_.aux_coeff), dx_.get(), &grad_ptrs_,
                                 backward_ws_.get(), backward_ws_.bytes(), stream_);
  }

  // Every output (y, dx, load, aux, saved, gradients) filled with `byte` (stream-ordered).
  void poison_outputs(int byte) {
    for (DevBuf* b : {&y_, &dx_, &load_, &aux_, &saved_}) b->fill(byte, stream_);
    for (const DevBuf* b : grads_.all()) b->fill(byte, stream_);
  }
  // Workspaces filled with `byte` (a library that reads scratch before writing it shows up).
  void poison_workspaces(int byte) {
    forward_ws_.fill(byte, stream_);
    backward_ws_.fill(byte, stream_);
  }

  moekit_layer_saved_view_t view() {
    moekit_layer_saved_view_t v;
    std::memset(&v, 0, sizeof(v));
    v.struct_size = sizeof(v);
    moekit_check(moekit_layer_saved_view(&config_, T_, saved_.get(), saved_.bytes(), &v), "moekit_layer_saved_view");
    return v;
  }

  // Every output and gradient as bytes, in a fixed order (for bitwise comparisons).
  std::vector<std::vector<uint8_t>> all_outputs() {
    std::vector<std::vector<uint8_t>> out;
    for (const DevBuf* b : {&y_, &dx_, &load_, &aux_}) out.push_back(download(*b, stream_));
    for (const DevBuf* b : grads_.all()) out.push_back(download(*b, stream_));
    // The saved pieces that are outputs in their own right (routing, plan, statistics).
    const moekit_layer_saved_view_t v = view();
    const size_t T = static_cast<size_t>(T_), K = lcase_.top_k(), E = lcase_.num_experts();
    out.push_back(download(v.weights, T * K * 4, stream_));
    out.push_back(download(v.indices, T * K * 4, stream_));
    out.push_back(download(v.expert_offsets, (E + 1) * 4, stream_));
    return out;
  }

  const LayerCase& lcase() const { return lcase_; }
  const moekit_layer_config_t& config() const { return config_; }
  moekit_layer_t layer() const { return layer_; }
  cudaStream_t stream() const { return stream_; }
  int64_t num_tokens() const { return T_; }
  size_t saved_bytes() const { return saved_bytes_; }
  size_t forward_bytes() const { return forward_bytes_; }
  size_t backward_bytes() const { return backward_bytes_; }
  const moekit_layer_params_t& params() const { return params_; }
  const moekit_layer_grads_t& grad_ptrs() const { return grad_ptrs_; }
  const GradBuffers& grads() const { return grads_; }
  DevBuf& x() { return x_; }
  DevBuf& y() { return y_; }
  DevBuf& dy() { return dy_; }
  DevBuf& dx() { return dx_; }
  DevBuf& mask() { return mask_; }
  DevBuf& load() { return load_; }
  DevBuf& aux() { return aux_; }
  DevBuf& saved() { return saved_; }
  DevBuf& forward_ws() { return forward_ws_; }
  DevBuf& backward_ws() { return backward_ws_; }

 private:
  DevBuf upload_values(const std::vector<double>& v) {
    if (v.empty()) return DevBuf();
    const std::vector<uint8_t> bytes = pack_d(lcase_.dtype, v);
    return DevBuf::from(bytes, stream_);
  }

  LayerCase lcase_;
  moekit_layer_config_t config_{};
  cudaStream_t stream_;
  int64_t T_;
  moekit_layer_t layer_ = nullptr;
  size_t saved_bytes_ = 0, forward_bytes_ = 0, backward_bytes_ = 0;
  DevBuf x_, mask_, y_, dy_, dx_, load_, aux_, saved_, forward_ws_, backward_ws_;
  ParamBuffers p_;
  GradBuffers grads_;
  moekit_layer_params_t params_{};
  moekit_layer_grads_t grad_ptrs_{};
};

}  // namespace moekit::test::layer
