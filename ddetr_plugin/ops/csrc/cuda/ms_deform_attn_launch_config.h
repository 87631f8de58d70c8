// Launch configuration of the multi-scale deformable attention CUDA kernels:
// block and grid sizes, channel packing, backward lane groups and the plan
// of the value gradient (atomics or the deterministic gather).
//
// Plain host C++ with no CUDA dependency, so that the launcher
// (ms_deform_attn_cuda.cu) and the CPU emulation of the kernels used by the
// test suite (tests/ops/cuda_emulation/) take exactly the same decisions.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace ddetr_plugin {
namespace cuda {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
// Enough blocks to fill any current GPU many times over; bigger problems
// are covered by the kernels' grid-stride loops.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;
// The widest channel pack the forward loads with one instruction.
constexpr int64_t kMaxPackBytes = 16;

struct ProblemSize {
  int64_t batch_size;
  int64_t num_keys;
  int64_t num_queries;
  int64_t num_heads;
  int64_t head_dims;
  int64_t num_levels;
  int64_t num_points;
};

// Blocks for num_threads threads. CUDA rejects a grid of 0 blocks ("invalid
// configuration argument"), so an empty launch is refused here, where the
// CPU emulation of the kernels sees it too: the launcher must skip a launch
// that has nothing to do.
inline int64_t num_blocks_for(int64_t num_threads) {
  if (num_threads <= 0) {
    throw std::invalid_argument(
        "ms_deform_attn (CUDA): a kernel launch for " +
        std::to_string(num_threads) +
        " threads (a grid of 0 blocks, which CUDA rejects); the launcher "
        "must skip it");
  }
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

// Bits that hold every integer in [0, max_key] (at least 1): the low bits
// a radix sort of such keys must order by; the higher ones are all zero.
inline int key_bits_for(int64_t max_key) {
  int bits = 1;
  while (bits < 63 && (max_key >> bits) != 0) {
    ++bits;
  }
  return bits;
}

// How the backward computes grad_value, decided on the host from the sizes
// and torch.use_deterministic_algorithms; the launcher and the CPU emulation
// both follow it, so the emulation runs the path the launcher would.
struct ValueGradPlan {
  // true: gathered in a fixed order (ms_deform_attn_deterministic.cuh) and
  // written whole in the value's dtype; false: scattered with atomics by the
  // backward kernel into a zeroed opmath_t buffer.
  bool gather;
  // Gather only; all 0 when grad_value is empty (no key, head, channel or
  // batch), in which case nothing is launched, sorted or allocated.
  // (query head, sample, corner) entries: threads of the corner-rows kernel.
  int64_t num_entries;
  // Value rows (batch, key, head); also the row key of corners outside the
  // map, which sorts after every real row.
  int64_t num_rows;
  // grad_value elements: threads of the gather kernel.
  int64_t num_items;
  // Low bits of the row keys the sort orders by: the keys are at most
  // num_rows, so key_bits_for(num_rows). At the R50 encoder size, batch 2,
  // 19 bits (2 x 22223 x 8 rows): 3 passes of CUB's 8-bit radix sort
  // instead of 8 over the whole 64-bit keys.
  int sort_key_bits;
};

// Called only when the backward has samples and channels (the launcher
// returns before otherwise).
inline ValueGradPlan plan_value_grad(const ProblemSize& size,
                                     bool deterministic) {
  ValueGradPlan plan{deterministic, 0, 0, 0, 0};
  if (!deterministic) {
    return plan;
  }
  const int64_t num_rows = size.batch_size * size.num_keys * size.num_heads;
  plan.num_items = num_rows * size.head_dims;
  if (plan.num_items == 0) {
    return plan;
  }
  plan.num_rows = num_rows;
  plan.num_entries = size.batch_size * size.num_queries * size.num_heads *
                     size.num_levels * size.num_points * 4;
  plan.sort_key_bits = key_bits_for(num_rows);
  return plan;
}

}  // namespace cuda
}  // namespace ddetr_plugin
