// Launch configuration of the multi-scale deformable attention CUDA kernels:
// block and grid sizes, channel packing and backward lane groups.
//
// Plain host C++ with no CUDA dependency, so that the launcher
// (ms_deform_attn_cuda.cu) and the CPU emulation of the kernels used by the
// test suite (tests/ops/cuda_emulation/) take exactly the same decisions.
#pragma once

#include <algorithm>
#include <cstdint>

namespace ddetr_plugin {
namespace cuda {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
// Enough blocks to fill any current GPU many times over; bigger problems
// are covered by the kernels' grid-stride loops.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;
// The widest channel pack the forward loads with one instruction.
constexpr int64_t kMaxPackBytes = 16;

inline int64_t num_blocks_for(int64_t num_threads) {
  return std::min((num_threads + kThreadsPerBlock - 1) / kThreadsPerBlock,
                  kMaxBlocks);
}

inline bool is_aligned(const void* address, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(address) % bytes == 0;
}

// Widest pack of channels (at most kMaxPackBytes) that divides head_dims
// and keeps every row of value and output aligned to the pack.
inline int forward_pack_width(int64_t head_dims, int64_t element_bytes,
                              const void* value, const void* output) {
  for (int width : {8, 4, 2}) {
    const int64_t bytes = width * element_bytes;
    if (bytes <= kMaxPackBytes && head_dims % width == 0 &&
        is_aligned(value, bytes) && is_aligned(output, bytes)) {
      return width;
    }
  }
  return 1;
}

// 2 when the backward can handle neighbouring channels in pairs (one load
// of each and one pair atomic into grad_value), else 1. element_bytes is
// the size of value's and grad_output's elements, accumulate_bytes that of
// grad_value's (the float32 accumulation buffer for half types).
inline int backward_pack_width(int64_t head_dims, int64_t element_bytes,
                               int64_t accumulate_bytes,
                               const void* grad_output, const void* value,
                               const void* grad_value) {
  const int64_t pair_bytes = 2 * element_bytes;
  const bool pairs = head_dims % 2 == 0 && is_aligned(value, pair_bytes) &&
                     is_aligned(grad_output, pair_bytes) &&
                     is_aligned(grad_value, 2 * accumulate_bytes);
  return pairs ? 2 : 1;
}

// Lanes per query head in the backward: the smallest power of two covering
// the head's packs, at most one warp (so a group never straddles a warp).
inline int backward_group_size(int64_t head_dims, int width) {
  const int64_t packs_per_head = head_dims / width;
  int group_size = 1;
  while (group_size < kWarpSize && group_size < packs_per_head) {
    group_size *= 2;
  }
  return group_size;
}

}  // namespace cuda
}  // namespace ddetr_plugin
