// Tuning numbers of the ep family, in one place. Plain C++ (no device code). Chosen by reasoning
// about H100/H200 (132 SMs, NCCL's p2p kernels on up to 32 blocks); the benchmark that checks them
// is bench/ep/moekit-bench-ep (--preset=deepseek-v3), whose dispatch/combine fraction of the
// all-to-all bandwidth is the number to watch when changing one.
#pragma once

namespace moekit::kernels::ep {

// Layout kernels: one thread per token, tiles of 256 tokens (= moekit::ep::kLayoutTileTokens).
constexpr int kLayoutThreads = 256;
constexpr int kLayoutWarps = kLayoutThreads / 32;

// Row movement (pack, reduce): one warp per token, 8 warps per block.
constexpr int kMoveThreads = 256;
constexpr int kMoveWarpsPerBlock = kMoveThreads / 32;
// Vectors each lane loads before it stores (pack) or adds (reduce): memory-level parallelism.
constexpr int kMoveUnroll = 4;
// While a chunk is on the wire, the next chunk's pack (or the previous chunk's reduce) runs beside
// NCCL's kernel. Its grid is capped at this many blocks per SM so that it never occupies every
// thread slot: NCCL's blocks find room as soon as they are launched instead of waiting for the
// pack's last wave (8 warps x 6 = 48 of the 64 warp slots of an SM).
constexpr int kMoveBlocksPerSm = 6;

// Small elementwise kernels (unpack, tails, weight gradients, rank sums).
constexpr int kSmallThreads = 256;

}  // namespace moekit::kernels::ep
