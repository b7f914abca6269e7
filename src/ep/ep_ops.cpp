// The EP operations: layout, dispatch, combine and both backwards over the caller's NCCL
// communicator, and the statistics reductions.
//
// Pipeline (num_chunks C > 1). Tokens are split into C chunks; chunk c of every rank moves in one
// NCCL group (ncclSend/ncclRecv to every peer). Dispatch packs chunk c + 1 on the handle's second
// stream while chunk c is on the wire on the caller's stream; combine sums chunk c on the second
// stream while chunk c + 1 is on the wire. Events order the two streams:
//   dispatch: caller --fork--> side: pack 0, pack 1, ... each followed by chunk[c];
//             caller: wait chunk[c], group c; (the last wait joins the side stream)
//   combine:  caller: group c, record chunk[c];  side: wait chunk[c], reduce c;
//             side --join--> caller.
// Both are stream-ordered (capturable: the fork/join pattern CUDA graphs accept). With C = 1 all
// of it runs on the caller's stream.
//
// Exact mode's one host read: moekit_ep_layout copies the exchanged counts into pinned memory,
// records counts_ready, enqueues the slot assignment and only then waits for counts_ready, so the
// device keeps working while the host waits.
#include "src/ep/ep_ops.hpp"

#include <algorithm>
#include <climits>
#include <memory>

#include "kernels/ep/launch.hpp"
#include "kernels/ep/tuning.hpp"
#include "src/common/error.hpp"
#include "src/common/workspace.hpp"
#include "src/ep/ep_build_config.h"
#include "src/ep/ep_plan.hpp"

#if MOEKIT_EP_HAVE_NCCL
#include <nccl.h>
#endif

namespace moekit::ep {

#if MOEKIT_EP_HAVE_NCCL

namespace {

namespace k = moekit::kernels::ep;

moekit_status_t fail_nccl(ncclResult_t result, ncclComm_t comm, const char* what) {
  const char* detail = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  return fail(MOEKIT_STATUS_NCCL_ERROR, "%s: NCCL error %d (%s)%s%s", what,
              static_cast<int>(result), ncclGetErrorString(result),
              detail != nullptr && detail[0] != '\0' ? ": " : "", detail != nullptr ? detail : "");
}

#define MOEKIT_NCCL_TRY(expr, comm, what)                                          \
  do {                                                                              \
    const ncclResult_t moekit_nccl_result_ = (expr);                                \
    if (moekit_nccl_result_ != ncclSuccess) return fail_nccl(moekit_nccl_result_, comm, what); \
  } while (0)

ncclComm_t comm_of(const moekit_ep& h) { return static_cast<ncclComm_t>(h.comm); }

// ncclGroupStart ... ncclGroupEnd that always ends the group, also when an operation inside fails
// (a thread must never be left inside a group).
class NcclGroup {
 public:
  explicit NcclGroup(ncclComm_t comm) : comm_(comm) {}
  ~NcclGroup() {
    if (open_) ncclGroupEnd();
  }
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  moekit_status_t start() {
    MOEKIT_NCCL_TRY(ncclGroupStart(), comm_, "ncclGroupStart");
    open_ = true;
    return MOEKIT_STATUS_SUCCESS;
  }
  moekit_status_t end() {
    open_ = false;
    MOEKIT_NCCL_TRY(ncclGroupEnd(), comm_, "ncclGroupEnd");
    return MOEKIT_STATUS_SUCCESS;
  }

 private:
  ncclComm_t comm_;
  bool open_ = false;
};

// Joins the side stream back into the caller's stream when a pipelined call leaves early on an
// error, so that the caller's stream (or capture) never keeps a dangling fork.
class SideJoin {
 public:
  SideJoin(const moekit_ep& h, cudaStream_t stream) : h_(h), stream_(stream) {}
  ~SideJoin() {
    if (armed_) {
      cudaEventRecord(h_.join, h_.side);
      cudaStreamWaitEvent(stream_, h_.join, 0);
    }
  }
  void arm() { armed_ = true; }
  moekit_status_t join() {
    armed_ = false;
    MOEKIT_CUDA_TRY(cudaEventRecord(h_.join, h_.side), "recording the pipeline's join event");
    MOEKIT_CUDA_TRY(cudaStreamWaitEvent(stream_, h_.join, 0), "joining the pipeline stream");
    return MOEKIT_STATUS_SUCCESS;
  }

 private:
  const moekit_ep& h_;
  cudaStream_t stream_;
  bool armed_ = false;
};

class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device) {
      changed_ = cudaSetDevice(device) == cudaSuccess;
    }
  }
  ~DeviceScope() {
    if (changed_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// The widest access (16 .. 1 bytes) that divides row_bytes and every address.
int vector_bytes(int64_t row_bytes, std::initializer_list<const void*> pointers) {
  uint64_t bits = static_cast<uint64_t>(row_bytes);
  for (const void* p : pointers) bits |= reinterpret_cast<uintptr_t>(p);
  for (int v : {16, 8, 4, 2})
    if (bits % static_cast<uint64_t>(v) == 0) return v;
  return 1;
}

bool aligned16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Grid cap of the row kernels: beside NCCL (pipelined) leave room for its blocks.
int move_blocks(const moekit_ep& h) {
  return h.side != nullptr ? h.sm_count * k::kMoveBlocksPerSm : h.sm_count * 32;
}

struct TokenRange {
  int64_t begin;
  int64_t end;
};

TokenRange chunk_range(int64_t num_tokens, int32_t num_chunks, int32_t chunk) {
  const int64_t L = chunk_tokens(num_tokens, num_chunks);
  return {std::min<int64_t>(chunk * L, num_tokens), std::min<int64_t>((chunk + 1) * L, num_tokens)};
}

LayoutPieces pieces_of(const moekit_ep& h, const void* layout) {
  WorkspaceCarver carver(const_cast<void*>(layout));
  return carve_layout(carver, h.dims);
}

// The buffers one group's operations read and write, by payload and row space (NULL where this
// rank has no rows of that kind: the script then lists no operation on it).
struct GroupBuffers {
  const int32_t* counts_out = nullptr;  // kCounts: [n][kExchangeStride] send side
  int32_t* counts_in = nullptr;         //          recv side
  uint8_t* rows[2] = {};                // kRows:    [send space, recv space]
  uint8_t* meta[2] = {};                // kMeta:    [send space, recv space], int32 [*, 2K + 1]
  uint8_t* weights[2] = {};             // kWeights: [send space, recv space], fp32 [*, K]
};

// One NCCL group of `call`: exactly the operations of for_each_op (src/ep/ep_plan.hpp), which the
// CPU suite checks pair by pair for simulated ranks.
moekit_status_t issue_group(const moekit_ep& h, const int64_t* host_layout, Call call,
                            int32_t group, Payloads payloads, const GroupBuffers& b,
                            cudaStream_t stream) {
  const Dims& d = h.dims;
  ncclComm_t comm = comm_of(h);
  NcclGroup nccl_group(comm);
  MOEKIT_TRY(nccl_group.start());
  MOEKIT_TRY(for_each_op(d, h.rank, host_layout, call, group, payloads, [&](const P2pOp& op) {
    uint8_t* base = nullptr;
    switch (op.payload) {
      case Payload::kCounts:
        base = op.send ? reinterpret_cast<uint8_t*>(const_cast<int32_t*>(b.counts_out))
                       : reinterpret_cast<uint8_t*>(b.counts_in);
        break;
      case Payload::kRows: base = b.rows[op.recv_space ? 1 : 0]; break;
      case Payload::kMeta: base = b.meta[op.recv_space ? 1 : 0]; break;
      case Payload::kWeights: base = b.weights[op.recv_space ? 1 : 0]; break;
    }
    // The API checks make every buffer with rows non-NULL; a NULL here is a bug of this file, and
    // failing is better than letting NCCL read address 0 (the peers still wait: a hang to debug,
    // never silent corruption).
    if (base == nullptr)
      return fail(MOEKIT_STATUS_INTERNAL_ERROR,
                  "%s: no buffer for a %s of %lld bytes with rank %d (payload %d)", call_name(call),
                  op.send ? "send" : "receive", static_cast<long long>(op.bytes), op.peer,
                  static_cast<int>(op.payload));
    void* at = base + op.first_row * payload_row_bytes(d, call, op.payload);
    if (op.send)
      MOEKIT_NCCL_TRY(ncclSend(at, static_cast<size_t>(op.bytes), ncclUint8, op.peer, comm, stream),
                      comm, "ncclSend");
    else
      MOEKIT_NCCL_TRY(ncclRecv(at, static_cast<size_t>(op.bytes), ncclUint8, op.peer, comm, stream),
                      comm, "ncclRecv");
    return MOEKIT_STATUS_SUCCESS;
  }));
  return nccl_group.end();
}

// Dispatch direction, shared by dispatch (with metadata) and combine backward (rows only):
// recv_rows[row of t at d] = src_rows[t] for every kept (t, d).
struct ForwardIo {
  Call call;                  // kDispatch (rows and metadata) or kCombineBackward (rows only)
  const void* src_rows;       // [T][row_bytes]
  void* recv_rows;            // [R][row_bytes]
  const int32_t* indices;     // metadata: [T, K] (NULL when T = 0)
  const float* weights;       // metadata: [T, K] (NULL when T = 0)
};

moekit_status_t forward_exchange(moekit_ep& h, int64_t num_tokens, const LayoutPieces& p,
                                 const int64_t* host_layout, const ForwardIo& io,
                                 const DispatchWorkspace& ws, cudaStream_t stream) {
  const Dims& d = h.dims;
  // From the call alone, never from io.indices: a rank with T = 0 passes NULL ids and must still
  // receive its peers' metadata (src/ep/ep_plan.hpp, "the NCCL script of a call").
  const Payloads payloads = call_payloads(io.call, false, false);
  const bool with_meta = payloads.meta;
  const bool pipelined = h.side != nullptr;
  cudaStream_t pack_stream = pipelined ? h.side : stream;
  const int vec = vector_bytes(d.row_bytes, {io.src_rows, ws.send_x, io.recv_rows});
  const int max_blocks = move_blocks(h);

  SideJoin side_join(h, stream);
  if (pipelined) {
    MOEKIT_CUDA_TRY(cudaEventRecord(h.fork, stream), "recording the pipeline's fork event");
    MOEKIT_CUDA_TRY(cudaStreamWaitEvent(h.side, h.fork, 0), "forking the pipeline stream");
    side_join.arm();
  }
  for (int32_t c = 0; c < d.num_chunks; ++c) {
    const TokenRange range = chunk_range(num_tokens, d.num_chunks, c);
    k::PackArgs pa{};
    pa.token_begin = range.begin;
    pa.token_end = range.end;
    pa.max_dests = d.max_dests;
    pa.rank = h.rank;
    pa.route_dest = p.route_dest;
    pa.route_slot = p.route_slot;
    pa.x = io.src_rows;
    pa.row_bytes = d.row_bytes;
    pa.send_x = ws.send_x;
    pa.recv_x = io.recv_rows;
    pa.top_k = d.top_k;
    pa.indices = io.indices;
    pa.weights = io.weights;
    pa.send_meta = with_meta ? ws.send_meta : nullptr;
    pa.recv_meta = with_meta ? ws.recv_meta : nullptr;
    MOEKIT_CUDA_TRY(k::launch_pack(pa, vec, max_blocks, pack_stream), "launching ep pack");
    if (d.capacity_mode) {  // gaps: the payload (both calls) and the metadata (dispatch)
      k::TailArgs ta{};
      ta.num_ranks = d.num_ranks;
      ta.rank = h.rank;
      ta.num_chunks = d.num_chunks;
      ta.chunk = c;
      ta.chunk_capacity = static_cast<int32_t>(d.chunk_capacity);
      ta.top_k = d.top_k;
      ta.exchange = p.exchange;
      ta.exchange_stride = kExchangeStride;
      ta.row_bytes = d.row_bytes;
      ta.send_x = ws.send_x;
      ta.recv_x = io.recv_rows;
      ta.send_meta = with_meta ? ws.send_meta : nullptr;
      ta.recv_meta = with_meta ? ws.recv_meta : nullptr;
      MOEKIT_CUDA_TRY(k::launch_mark_tails(ta, vec, max_blocks, pack_stream), "launching ep mark_tails");
    }
    if (pipelined) {
      MOEKIT_CUDA_TRY(cudaEventRecord(h.chunk[c], h.side), "recording a chunk event");
      MOEKIT_CUDA_TRY(cudaStreamWaitEvent(stream, h.chunk[c], 0), "waiting for a packed chunk");
    }
    GroupBuffers b;
    b.rows[0] = ws.send_x;
    b.rows[1] = static_cast<uint8_t*>(io.recv_rows);
    if (with_meta) {
      b.meta[0] = reinterpret_cast<uint8_t*>(ws.send_meta);
      b.meta[1] = reinterpret_cast<uint8_t*>(ws.recv_meta);
    }
    MOEKIT_TRY(issue_group(h, host_layout, io.call, c, payloads, b, stream));
  }
  if (pipelined) MOEKIT_TRY(side_join.join());  // already ordered by the last chunk wait; cheap
  return MOEKIT_STATUS_SUCCESS;
}

// Combine direction, shared by combine and dispatch backward:
// out[t] = rank-ordered fp32 sum of rows_in over t's rows; optionally the weight gradients of
// the recv space come back into ws.peer_weights.
struct ReverseIo {
  Call call;                        // kCombine or kDispatchBackward
  const void* rows_in;              // [R][H] of in_dtype (recv space)
  moekit_dtype_t in_dtype;
  // Whether weight gradients move too (call_payloads): the same on every rank, decided by whether
  // the caller asked for them (either pointer given), never by whether this rank has rows.
  Payloads payloads;
  const float* recv_space_weights;  // [R][K] (may be NULL when R = 0)
  void* out;                        // [T][H] of dims.dtype
};

moekit_status_t reverse_exchange(moekit_ep& h, int64_t num_tokens, const LayoutPieces& p,
                                 const int64_t* host_layout, const ReverseIo& io,
                                 const CombineWorkspace& ws, cudaStream_t stream) {
  const Dims& d = h.dims;
  const bool pipelined = h.side != nullptr;
  cudaStream_t reduce_stream = pipelined ? h.side : stream;
  const bool vectorized = d.hidden % 8 == 0 && aligned16({io.rows_in, ws.peer_rows, io.out});
  const int max_blocks = move_blocks(h);

  SideJoin side_join(h, stream);
  for (int32_t c = 0; c < d.num_chunks; ++c) {
    GroupBuffers b;
    b.rows[0] = ws.peer_rows;
    b.rows[1] = static_cast<uint8_t*>(const_cast<void*>(io.rows_in));
    if (io.payloads.weights) {
      b.weights[0] = reinterpret_cast<uint8_t*>(ws.peer_weights);
      b.weights[1] = reinterpret_cast<uint8_t*>(const_cast<float*>(io.recv_space_weights));
    }
    MOEKIT_TRY(issue_group(h, host_layout, io.call, c, io.payloads, b, stream));
    if (pipelined) {
      MOEKIT_CUDA_TRY(cudaEventRecord(h.chunk[c], stream), "recording a chunk event");
      MOEKIT_CUDA_TRY(cudaStreamWaitEvent(h.side, h.chunk[c], 0), "waiting for a received chunk");
      side_join.arm();
    }
    const TokenRange range = chunk_range(num_tokens, d.num_chunks, c);
    k::ReduceArgs ra{};
    ra.token_begin = range.begin;
    ra.token_end = range.end;
    ra.max_dests = d.max_dests;
    ra.rank = h.rank;
    ra.hidden = d.hidden;
    ra.route_dest = p.route_dest;
    ra.route_slot = p.route_slot;
    ra.self_rows = io.rows_in;
    ra.peer_rows = ws.peer_rows;
    ra.out = io.out;
    MOEKIT_CUDA_TRY(k::launch_reduce(io.in_dtype, d.dtype, vectorized, ra, max_blocks, reduce_stream),
                    "launching ep reduce");
  }
  if (pipelined) MOEKIT_TRY(side_join.join());
  return MOEKIT_STATUS_SUCCESS;
}

}  // namespace

bool built_with_nccl() { return true; }

moekit_status_t nccl_version(int32_t* version) {
  int v = 0;
  MOEKIT_NCCL_TRY(ncclGetVersion(&v), nullptr, "ncclGetVersion");
  *version = v;
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t comm_size(void* comm, int32_t* n) {
  int count = 0;
  MOEKIT_NCCL_TRY(ncclCommCount(static_cast<ncclComm_t>(comm), &count),
                  static_cast<ncclComm_t>(comm), "ncclCommCount(nccl_comm)");
  *n = count;
  return MOEKIT_STATUS_SUCCESS;
}

void destroy(moekit_ep* h) {
  if (h == nullptr) return;
  DeviceScope scope(h->device);
  for (cudaEvent_t& e : h->chunk)
    if (e != nullptr) cudaEventDestroy(e);
  if (h->fork != nullptr) cudaEventDestroy(h->fork);
  if (h->join != nullptr) cudaEventDestroy(h->join);
  if (h->counts_ready != nullptr) cudaEventDestroy(h->counts_ready);
  if (h->side != nullptr) cudaStreamDestroy(h->side);
  if (h->host_staging != nullptr) cudaFreeHost(h->host_staging);
  h->magic = 0;
  delete h;
}

moekit_status_t create(const moekit_ep_config_t& config, void* comm_ptr, moekit_ep** out) {
  ncclComm_t comm = static_cast<ncclComm_t>(comm_ptr);
  int count = 0, rank = 0, device = 0;
  MOEKIT_NCCL_TRY(ncclCommCount(comm, &count), comm, "ncclCommCount(nccl_comm)");
  MOEKIT_NCCL_TRY(ncclCommUserRank(comm, &rank), comm, "ncclCommUserRank(nccl_comm)");
  MOEKIT_NCCL_TRY(ncclCommCuDevice(comm, &device), comm, "ncclCommCuDevice(nccl_comm)");
  if (count != config.num_ranks)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                "config->num_ranks = %d differs from the communicator's size %d",
                config.num_ranks, count);

  std::unique_ptr<moekit_ep, void (*)(moekit_ep*)> h(new moekit_ep(), destroy);
  h->config = config;
  h->dims = dims_of(config);
  h->signature = config_signature(config);
  h->comm = comm_ptr;
  h->rank = rank;
  h->device = device;

  DeviceScope scope(device);
  MOEKIT_CUDA_TRY(cudaDeviceGetAttribute(&h->sm_count, cudaDevAttrMultiProcessorCount, device),
                  "reading the device's SM count");
  MOEKIT_CUDA_TRY(cudaEventCreateWithFlags(&h->counts_ready, cudaEventDisableTiming),
                  "creating an event");
  if (config.num_chunks > 1) {
    MOEKIT_CUDA_TRY(cudaStreamCreateWithFlags(&h->side, cudaStreamNonBlocking),
                    "creating the pipeline stream");
    MOEKIT_CUDA_TRY(cudaEventCreateWithFlags(&h->fork, cudaEventDisableTiming), "creating an event");
    MOEKIT_CUDA_TRY(cudaEventCreateWithFlags(&h->join, cudaEventDisableTiming), "creating an event");
    for (int c = 0; c < config.num_chunks; ++c)
      MOEKIT_CUDA_TRY(cudaEventCreateWithFlags(&h->chunk[c], cudaEventDisableTiming),
                      "creating an event");
  }
  const size_t staging = 2 * static_cast<size_t>(config.num_ranks) * kExchangeStride;
  MOEKIT_CUDA_TRY(cudaMallocHost(reinterpret_cast<void**>(&h->host_staging),
                                 staging * sizeof(int32_t)),
                  "allocating the pinned count buffer");
  *out = h.release();
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t check_device(const moekit_ep& h) {
  int current = -1;
  MOEKIT_CUDA_TRY(cudaGetDevice(&current), "reading the current device");
  if (current != h.device)
    return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                "the current device is %d, but the handle's communicator is on device %d "
                "(cudaSetDevice first)",
                current, h.device);
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t layout(moekit_ep& h, int64_t num_tokens, const int32_t* indices,
                       const uint8_t* token_mask, void* layout_buffer, int64_t* host_layout,
                       int64_t* num_recv_rows, int32_t* dropped, cudaStream_t stream) {
  const Dims& d = h.dims;
  if (!d.capacity_mode) {
    // The host read below cannot be captured: refuse before anything is enqueued.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MOEKIT_CUDA_TRY(cudaStreamIsCapturing(stream, &capture), "querying the stream's capture");
    if (capture != cudaStreamCaptureStatusNone)
      return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                  "stream is being captured, but exact mode reads the exchanged counts on the host "
                  "(use MOEKIT_EP_MODE_CAPACITY inside a CUDA graph)");
  }
  const LayoutPieces p = pieces_of(h, layout_buffer);
  const int32_t n = d.num_ranks, C = d.num_chunks, P = kExchangeStride;

  k::LayoutArgs a{};
  a.indices = indices;
  a.token_mask = token_mask;
  a.num_tokens = num_tokens;
  a.top_k = d.top_k;
  a.num_experts = d.num_experts;
  a.experts_per_rank = d.experts_per_rank;
  a.num_ranks = n;
  a.rank = h.rank;
  a.num_chunks = C;
  a.chunk_tokens = chunk_tokens(num_tokens, C);
  a.tiles_per_chunk = static_cast<int32_t>(tiles_per_chunk(num_tokens, C));
  a.max_dests = d.max_dests;
  a.capacity_mode = d.capacity_mode ? 1 : 0;
  a.chunk_capacity = static_cast<int32_t>(d.chunk_capacity);
  a.signature = h.signature;
  a.exchange_stride = kExchangeStride;
  a.tile_counts = p.tile_counts;
  a.exchange = p.exchange;
  a.starts = p.starts;
  a.totals = p.totals;
  a.route_dest = p.route_dest;
  a.route_slot = p.route_slot;

  MOEKIT_CUDA_TRY(k::launch_layout_count(a, stream), "launching ep layout_count");
  int32_t* exchange_recv = p.exchange + static_cast<int64_t>(n) * P;
  if (!d.capacity_mode) {
    // The count exchange: the counts and the configuration signature to every rank (itself
    // too), kExchangeStride int32 each whatever num_chunks is.
    GroupBuffers b;
    b.counts_out = p.exchange;
    b.counts_in = exchange_recv;
    MOEKIT_TRY(issue_group(h, nullptr, Call::kLayout, 0, call_payloads(Call::kLayout, false, false),
                           b, stream));
  }
  MOEKIT_CUDA_TRY(k::launch_layout_offsets(a, stream), "launching ep layout_offsets");
  if (!d.capacity_mode) {
    MOEKIT_CUDA_TRY(cudaMemcpyAsync(h.host_staging, p.exchange,
                                    2 * static_cast<size_t>(n) * P * sizeof(int32_t),
                                    cudaMemcpyDeviceToHost, stream),
                    "copying the exchanged counts to the host");
    MOEKIT_CUDA_TRY(cudaEventRecord(h.counts_ready, stream), "recording the counts event");
  }
  MOEKIT_CUDA_TRY(k::launch_layout_assign(a, stream), "launching ep layout_assign");
  if (dropped != nullptr)
    MOEKIT_CUDA_TRY(cudaMemcpyAsync(dropped, p.totals + kTotalDropped, sizeof(int32_t),
                                    cudaMemcpyDeviceToDevice, stream),
                    "copying the dropped count");

  if (d.capacity_mode) {
    if (num_recv_rows != nullptr) *num_recv_rows = row_spaces(d, nullptr).recv_rows;
    return MOEKIT_STATUS_SUCCESS;
  }
  // The one host read of exact mode.
  MOEKIT_CUDA_TRY(cudaEventSynchronize(h.counts_ready), "waiting for the exchanged counts");
  const int32_t* staged_send = h.host_staging;
  const int32_t* staged_recv = h.host_staging + static_cast<int64_t>(n) * P;
  for (int32_t peer = 0; peer < n; ++peer) {
    const int32_t theirs = staged_recv[static_cast<int64_t>(peer) * P + P - 1];
    if (theirs != h.signature)
      return fail(MOEKIT_STATUS_INVALID_ARGUMENT,
                  "rank %d was created with a different configuration than this rank %d "
                  "(signature %d, here %d): every rank must pass the same moekit_ep_config_t",
                  peer, h.rank, theirs, h.signature);
  }
  fill_host_layout(d, h.signature, h.rank, num_tokens, staged_send, staged_recv, host_layout);
  if (num_recv_rows != nullptr) *num_recv_rows = host_layout[kHlRecvRows];
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t dispatch(moekit_ep& h, int64_t num_tokens, const void* layout_buffer,
                         const int64_t* host_layout, const void* x, const int32_t* indices,
                         const float* weights, void* recv_x, int32_t* recv_indices,
                         float* recv_weights, int32_t* recv_src_token, uint8_t* recv_mask,
                         void* workspace, cudaStream_t stream) {
  const Dims& d = h.dims;
  const RowSpaces rows = row_spaces(d, host_layout);
  WorkspaceCarver carver(workspace);
  const DispatchWorkspace ws = carve_dispatch_workspace(carver, d, rows);
  const LayoutPieces p = pieces_of(h, layout_buffer);
  ForwardIo io{Call::kDispatch, x, recv_x, indices, weights};
  MOEKIT_TRY(forward_exchange(h, num_tokens, p, host_layout, io, ws, stream));
  k::UnpackArgs ua{};
  ua.recv_meta = ws.recv_meta;
  ua.rows = rows.recv_rows;
  ua.top_k = d.top_k;
  ua.recv_indices = recv_indices;
  ua.recv_weights = recv_weights;
  ua.recv_src_token = recv_src_token;
  ua.recv_mask = recv_mask;
  MOEKIT_CUDA_TRY(k::launch_unpack(ua, stream), "launching ep unpack");
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t combine(moekit_ep& h, int64_t num_tokens, const void* layout_buffer,
                        const int64_t* host_layout, const void* partials, void* y, void* workspace,
                        cudaStream_t stream) {
  const Dims& d = h.dims;
  WorkspaceCarver carver(workspace);
  const CombineWorkspace ws = carve_combine_workspace(carver, d, row_spaces(d, host_layout));
  ReverseIo io{Call::kCombine, partials, d.combine_dtype, call_payloads(Call::kCombine, false, false),
               nullptr, y};
  return reverse_exchange(h, num_tokens, pieces_of(h, layout_buffer), host_layout, io, ws, stream);
}

moekit_status_t dispatch_backward(moekit_ep& h, int64_t num_tokens, const void* layout_buffer,
                                  const int64_t* host_layout, const int32_t* indices,
                                  const void* grad_recv_x, const float* grad_recv_weights,
                                  void* grad_x, float* grad_weights, void* workspace,
                                  cudaStream_t stream) {
  const Dims& d = h.dims;
  WorkspaceCarver carver(workspace);
  const CombineWorkspace ws = carve_combine_workspace(carver, d, row_spaces(d, host_layout));
  const LayoutPieces p = pieces_of(h, layout_buffer);
  const Payloads payloads = call_payloads(Call::kDispatchBackward, grad_weights != nullptr,
                                         grad_recv_weights != nullptr);
  ReverseIo io{Call::kDispatchBackward, grad_recv_x, d.dtype, payloads, grad_recv_weights, grad_x};
  MOEKIT_TRY(reverse_exchange(h, num_tokens, p, host_layout, io, ws, stream));
  if (grad_weights == nullptr) return MOEKIT_STATUS_SUCCESS;
  k::GradWeightsArgs ga{};
  ga.num_tokens = num_tokens;
  ga.top_k = d.top_k;
  ga.num_experts = d.num_experts;
  ga.experts_per_rank = d.experts_per_rank;
  ga.max_dests = d.max_dests;
  ga.rank = h.rank;
  ga.indices = indices;
  ga.route_dest = p.route_dest;
  ga.route_slot = p.route_slot;
  ga.self_weights = grad_recv_weights;
  ga.peer_weights = ws.peer_weights;
  ga.grad_weights = grad_weights;
  MOEKIT_CUDA_TRY(k::launch_grad_weights(ga, stream), "launching ep grad_weights");
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t combine_backward(moekit_ep& h, int64_t num_tokens, const void* layout_buffer,
                                 const int64_t* host_layout, const void* grad_y,
                                 void* grad_partials, void* workspace, cudaStream_t stream) {
  const Dims& d = h.dims;
  WorkspaceCarver carver(workspace);
  const DispatchWorkspace ws = carve_dispatch_workspace(carver, d, row_spaces(d, host_layout));
  ForwardIo io{Call::kCombineBackward, grad_y, grad_partials, nullptr, nullptr};
  return forward_exchange(h, num_tokens, pieces_of(h, layout_buffer), host_layout, io, ws, stream);
}

moekit_status_t allreduce_expert_load(void* comm_ptr, int32_t num_experts, int32_t* expert_load,
                                      cudaStream_t stream) {
  ncclComm_t comm = static_cast<ncclComm_t>(comm_ptr);
  MOEKIT_NCCL_TRY(ncclAllReduce(expert_load, expert_load, static_cast<size_t>(num_experts),
                                ncclInt32, ncclSum, comm, stream),
                  comm, "ncclAllReduce (expert load)");
  return MOEKIT_STATUS_SUCCESS;
}

moekit_status_t allreduce_aux_stats(void* comm_ptr, int32_t num_ranks, int32_t num_experts,
                                    float* aux_score_sum, int32_t* aux_token_count,
                                    void* workspace, cudaStream_t stream) {
  ncclComm_t comm = static_cast<ncclComm_t>(comm_ptr);
  if (aux_score_sum != nullptr) {
    float* gathered = static_cast<float*>(workspace);
    MOEKIT_NCCL_TRY(ncclAllGather(aux_score_sum, gathered, static_cast<size_t>(num_experts),
                                  ncclFloat32, comm, stream),
                    comm, "ncclAllGather (aux score sums)");
    MOEKIT_CUDA_TRY(kernels::ep::launch_sum_ranks(gathered, num_ranks, num_experts, aux_score_sum,
                                                  stream),
                    "launching ep sum_ranks");
  }
  if (aux_token_count != nullptr)
    MOEKIT_NCCL_TRY(ncclAllReduce(aux_token_count, aux_token_count, 1, ncclInt32, ncclSum, comm,
                                  stream),
                    comm, "ncclAllReduce (aux token count)");
  return MOEKIT_STATUS_SUCCESS;
}

#else  // !MOEKIT_EP_HAVE_NCCL

namespace {
moekit_status_t no_nccl() {
  return fail(MOEKIT_STATUS_NOT_AVAILABLE,
              "moekit was built without NCCL, so expert parallelism is not available (install "
              "NCCL and reconfigure with -Dnccl=enabled)");
}
}  // namespace

bool built_with_nccl() { return false; }
moekit_status_t nccl_version(int32_t*) { return no_nccl(); }
moekit_status_t comm_size(void*, int32_t*) { return no_nccl(); }
void destroy(moekit_ep* h) { delete h; }
moekit_status_t create(const moekit_ep_config_t&, void*, moekit_ep**) { return no_nccl(); }
moekit_status_t check_device(const moekit_ep&) { return no_nccl(); }
moekit_status_t layout(moekit_ep&, int64_t, const int32_t*, const uint8_t*, void*, int64_t*,
                       int64_t*, int32_t*, cudaStream_t) {
  return no_nccl();
}
moekit_status_t dispatch(moekit_ep&, int64_t, const void*, const int64_t*, const void*,
                         const int32_t*, const float*, void*, int32_t*, float*, int32_t*, uint8_t*,
                         void*, cudaStream_t) {
  return no_nccl();
}
moekit_status_t combine(moekit_ep&, int64_t, const void*, const int64_t*, const void*, void*,
                        void*, cudaStream_t) {
  return no_nccl();
}
moekit_status_t dispatch_backward(moekit_ep&, int64_t, const void*, const int64_t*,
                                  const int32_t*, const void*, const float*, void*, float*, void*,
                                  cudaStream_t) {
  return no_nccl();
}
moekit_status_t combine_backward(moekit_ep&, int64_t, const void*, const int64_t*, const void*,
                                 void*, void*, cudaStream_t) {
  return no_nccl();
}
moekit_status_t allreduce_expert_load(void*, int32_t, int32_t*, cudaStream_t) { return no_nccl(); }
moekit_status_t allreduce_aux_stats(void*, int32_t, int32_t, float*, int32_t*, void*,
                                    cudaStream_t) {
  return no_nccl();
}

#endif  // MOEKIT_EP_HAVE_NCCL

}  // namespace moekit::ep
