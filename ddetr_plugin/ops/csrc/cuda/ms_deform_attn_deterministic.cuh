// Deterministic value gradient of multi-scale deformable attention: a
// gather instead of the backward kernel's atomic scatter, used under
// torch.use_deterministic_algorithms(True).
//
// Atomic adds into grad_value commit in whatever order the hardware runs
// them, so float sums differ in their last bits from run to run. Here every
// grad_value element is summed by one thread, over its contributions in a
// fixed order:
//
//   1. ms_deform_attn_corner_rows_kernel: one thread per (query head,
//      sample, corner) entry writes the value row the corner reads,
//      (batch * keys + key) * heads + head, or num_rows for a corner
//      outside the map, and its weight attention * bilinear weight.
//   2. The launcher sorts the entries by row with a stable radix sort over
//      the bits the row numbers need (plan_value_grad), so each row's
//      entries are contiguous and in increasing entry order, and finds each
//      row's segment with searchsorted.
//   3. ms_deform_attn_value_grad_gather_kernel: one thread per (row,
//      channel) sums weight * grad_output over its segment, in that order,
//      with fused multiply-adds, and writes the element once.
//
// The result depends on neither the launch configuration nor the order in
// which threads run, and every rounding is explicit (products, fused
// multiply-adds, no expression the compiler may contract), so the CPU
// emulation computes the same bits as a GPU. Cost: 36 bytes of scratch per
// entry in float32 (4 entries per sample; 410 MB at the R50 encoder size,
// batch 1; docs/benchmarks.md) and a sort, which is why it is opt-in.
// Shapes and the "query head" as in ms_deform_attn_kernels.cuh.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>

#include "ms_deform_attn_kernels.cuh"

namespace ddetr_plugin {
namespace cuda {

// Step 1. entry = (query_head * samples_per_head + sample) * 4 + corner.
// rows: (num_entries,) int64; scales: (num_entries,) opmath_t.
template <typename opmath_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_corner_rows_kernel(
        const int64_t* __restrict__ spatial_shapes,
        const int64_t* __restrict__ level_start_index,
        const opmath_t* __restrict__ sampling_locations,
        const opmath_t* __restrict__ attention_weights,
        int64_t* __restrict__ rows, opmath_t* __restrict__ scales,
        const ProblemSize size) {
  const int64_t samples_per_head = size.num_levels * size.num_points;
  const int64_t num_query_heads =
      size.batch_size * size.num_queries * size.num_heads;
  const int64_t num_entries = num_query_heads * samples_per_head * 4;
  const int64_t num_rows = size.batch_size * size.num_keys * size.num_heads;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t entry =
           static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       entry < num_entries; entry += stride) {
    const int corner = static_cast<int>(entry % 4);
    const int64_t sample_index = entry / 4;  // query_head * samples + sample
    const int64_t query_head = sample_index / samples_per_head;
    const int64_t level =
        (sample_index % samples_per_head) / size.num_points;
    const int64_t head = query_head % size.num_heads;
    const int64_t batch = query_head / (size.num_queries * size.num_heads);
    // Levels outside the keys are 0 x 0 maps, as in the other kernels.
    const int64_t start = level_start_index[level];
    const bool fits =
        level_fits(spatial_shapes[2 * level], spatial_shapes[2 * level + 1],
                   start, size.num_keys);
    const int64_t height = fits ? spatial_shapes[2 * level] : 0;
    const int64_t width = fits ? spatial_shapes[2 * level + 1] : 0;
    const BilinearCorners<opmath_t> corners =
        locate_corners(sampling_locations[2 * sample_index],
                       sampling_locations[2 * sample_index + 1], height,
                       width);
    if (!corners.any_inside || corners.keys[corner] < 0) {
      rows[entry] = num_rows;  // sorts after every real row
      scales[entry] = opmath_t(0);
      continue;
    }
    const int64_t key = start + corners.keys[corner];
    rows[entry] = (batch * size.num_keys + key) * size.num_heads + head;
    scales[entry] = attention_weights[sample_index] * corners.weights[corner];
  }
}

// Step 3. row_offsets: (num_rows + 1,), the first sorted entry of each row;
// order: (num_entries,), the entry at each sorted position. Writes every
// element of grad_value (zero for rows that nothing samples).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_value_grad_gather_kernel(
        const scalar_t* __restrict__ grad_output,
        const int64_t* __restrict__ row_offsets,
        const int64_t* __restrict__ order,
        const at::opmath_type<scalar_t>* __restrict__ scales,
        scalar_t* __restrict__ grad_value, const ProblemSize size) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t entries_per_head = size.num_levels * size.num_points * 4;
  const int64_t num_rows = size.batch_size * size.num_keys * size.num_heads;
  const int64_t num_items = num_rows * size.head_dims;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t item =
           static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       item < num_items; item += stride) {
    const int64_t row = item / size.head_dims;
    const int64_t channel = item % size.head_dims;
    opmath_t sum = opmath_t(0);
    for (int64_t position = row_offsets[row]; position < row_offsets[row + 1];
         ++position) {
      const int64_t entry = order[position];
      const int64_t query_head = entry / entries_per_head;
      sum = fused_multiply_add(
          scales[entry],
          static_cast<opmath_t>(
              grad_output[query_head * size.head_dims + channel]),
          sum);
    }
    grad_value[item] = static_cast<scalar_t>(sum);
  }
}

}  // namespace cuda
}  // namespace ddetr_plugin
