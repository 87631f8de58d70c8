// CUDA kernels of multi-scale deformable attention, forward and backward.
//
// Shape shorthand (all tensors contiguous):
//   value              (batch, keys, heads, head_dims)
//   spatial_shapes     (levels, 2) int64, (height, width) of each level
//   level_start_index  (levels,) int64, first key of each level
//   sampling_locations (batch, queries, heads, levels, points, 2), (x, y)
//   attention_weights  (batch, queries, heads, levels, points)
//   output             (batch, queries, heads * head_dims)
// A "query head" is one (batch, query, head) triple; its linear index
// (batch * queries + query) * heads + head addresses its row of the output
// and its block of levels * points samples, so the kernels index with it.
// Every offset is int64: batch * keys * heads * head_dims alone exceeds 2^31
// for large feature maps.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>

#include "ms_deform_attn_device_helpers.cuh"
#include "ms_deform_attn_launch_config.h"

namespace ddetr_plugin {
namespace cuda {

// Forward: one thread per (query head, pack of kWidth channels).
//
// Neighbouring threads hold neighbouring channel packs of the same query
// head, so each corner read by a warp is one contiguous, coalesced segment
// of the value row, and the sampling location and weight they all need are
// a broadcast. Packs of up to 16 bytes cut the number of load instructions
// and of redundant corner computations by kWidth. A warp per query head was
// not chosen: the forward has no reduction across channels, so it would only
// add idle lanes whenever head_dims / kWidth is not a multiple of 32. The
// sums are opmath_t and written once, so no output zero-fill is needed.
template <typename scalar_t, int kWidth>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_forward_kernel(
        const scalar_t* __restrict__ value,
        const int64_t* __restrict__ spatial_shapes,
        const int64_t* __restrict__ level_start_index,
        const at::opmath_type<scalar_t>* __restrict__ sampling_locations,
        const at::opmath_type<scalar_t>* __restrict__ attention_weights,
        scalar_t* __restrict__ output, const ProblemSize size) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t packs_per_head = size.head_dims / kWidth;
  const int64_t num_query_heads =
      size.batch_size * size.num_queries * size.num_heads;
  const int64_t num_items = num_query_heads * packs_per_head;
  const int64_t samples_per_head = size.num_levels * size.num_points;
  const int64_t key_stride = size.num_heads * size.head_dims;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;

  for (int64_t item =
           static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       item < num_items; item += stride) {
    const int64_t query_head = item / packs_per_head;
    const int64_t channel = (item % packs_per_head) * kWidth;
    const int64_t head = query_head % size.num_heads;
    const int64_t batch = query_head / (size.num_queries * size.num_heads);
    const scalar_t* value_head =
        value + (batch * size.num_keys * size.num_heads + head) *
                    size.head_dims +
        channel;
    const opmath_t* locations =
        sampling_locations + query_head * samples_per_head * 2;
    const opmath_t* weights = attention_weights + query_head * samples_per_head;

    opmath_t sums[kWidth];
#pragma unroll
    for (int lane_channel = 0; lane_channel < kWidth; ++lane_channel) {
      sums[lane_channel] = opmath_t(0);
    }
    for (int64_t level = 0; level < size.num_levels; ++level) {
      // A level that does not fit in the keys reads nothing: as a 0 x 0
      // map, all its samples are outside.
      const int64_t start = level_start_index[level];
      const bool fits =
          level_fits(spatial_shapes[2 * level], spatial_shapes[2 * level + 1],
                     start, size.num_keys);
      const int64_t height = fits ? spatial_shapes[2 * level] : 0;
      const int64_t width = fits ? spatial_shapes[2 * level + 1] : 0;
      const scalar_t* value_level =
          value_head + (fits ? start : 0) * key_stride;
      for (int64_t point = 0; point < size.num_points; ++point) {
        const int64_t sample = level * size.num_points + point;
        const BilinearCorners<opmath_t> corners = locate_corners(
            locations[2 * sample], locations[2 * sample + 1], height, width);
        if (!corners.any_inside) {
          continue;
        }
        const opmath_t attention = weights[sample];
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (corners.keys[corner] < 0) {
            continue;
          }
          const ChannelPack<scalar_t, kWidth> pack =
              load_pack<scalar_t, kWidth>(value_level +
                                          corners.keys[corner] * key_stride);
          const opmath_t scale = attention * corners.weights[corner];
#pragma unroll
          for (int lane_channel = 0; lane_channel < kWidth; ++lane_channel) {
            sums[lane_channel] +=
                scale * static_cast<opmath_t>(pack.channels[lane_channel]);
          }
        }
      }
    }
    ChannelPack<scalar_t, kWidth> result;
#pragma unroll
    for (int lane_channel = 0; lane_channel < kWidth; ++lane_channel) {
      result.channels[lane_channel] = static_cast<scalar_t>(sums[lane_channel]);
    }
    store_pack<scalar_t, kWidth>(
        output + query_head * size.head_dims + channel, result);
  }
}

// Backward: one group of group_size lanes per query head, lanes over packs
// of kWidth channels (kWidth is 1 or 2), group_size the power of two
// >= head_dims / kWidth capped at a warp.
//
// grad_attention_weights and grad_sampling_locations of a sample are sums
// over the head's channels, so each lane accumulates its channels in
// registers, the group reduces them with shuffles, and lane 0 writes the
// result with a plain store: no atomics and no zero-fill for those two
// outputs, since every sample is written exactly once (zeros for samples
// outside the map). grad_value is a scatter: the same value element is hit
// by many queries, so it takes one atomic add per (corner, channel pack)
// into grad_value, the one buffer zeroed beforehand. With kWidth == 2 those
// atomics are pairs (one float2 atomic on sm_90).
//
// Precision: everything is computed in opmath_t, and grad_value is an
// opmath_t buffer (float32 for half and bfloat16) that the launcher rounds
// to the value's dtype once, after the kernel. Atomics in half precision
// would round every contribution: at the R50 encoder size a key of the
// coarsest level receives about a thousand of them, and bfloat16 gradients
// were off by 2e-2 of their magnitude; with float32 accumulation only the
// final rounding remains.
//
// kScatterValueGrad false leaves grad_value alone (it may be null): the
// deterministic backward computes it by a gather instead
// (ms_deform_attn_deterministic.cuh) and takes only the location and
// weight gradients from here, which have one writer each.
//
// Groups never straddle a warp (group_size divides 32), and the loop bound
// is tested on the warp's first thread, so every lane of a warp runs the
// same iterations and the full-mask shuffles are legal; lanes past the end
// run with no channels and write nothing.
template <typename scalar_t, int kWidth, bool kScatterValueGrad = true>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_backward_kernel(
        const scalar_t* __restrict__ grad_output,
        const scalar_t* __restrict__ value,
        const int64_t* __restrict__ spatial_shapes,
        const int64_t* __restrict__ level_start_index,
        const at::opmath_type<scalar_t>* __restrict__ sampling_locations,
        const at::opmath_type<scalar_t>* __restrict__ attention_weights,
        at::opmath_type<scalar_t>* __restrict__ grad_value,
        at::opmath_type<scalar_t>* __restrict__ grad_sampling_locations,
        at::opmath_type<scalar_t>* __restrict__ grad_attention_weights,
        const ProblemSize size, const int group_size) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t packs_per_head = size.head_dims / kWidth;
  const int64_t num_query_heads =
      size.batch_size * size.num_queries * size.num_heads;
  const int64_t num_threads_needed = num_query_heads * group_size;
  const int64_t samples_per_head = size.num_levels * size.num_points;
  const int64_t key_stride = size.num_heads * size.head_dims;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int lane_in_warp = threadIdx.x % kWarpSize;
  // blockDim.x and the stride are multiples of 32, so the position inside
  // the group never changes across iterations.
  const int lane = threadIdx.x % group_size;

  for (int64_t thread_item =
           static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       thread_item - lane_in_warp < num_threads_needed;
       thread_item += stride) {
    const bool active = thread_item < num_threads_needed;
    // Inactive lanes read the first query head's (valid) inputs so that the
    // code stays branch-free up to the shuffles; they touch no channel.
    const int64_t query_head = active ? thread_item / group_size : 0;
    const int64_t first_pack = active ? lane : packs_per_head;
    const int64_t head = query_head % size.num_heads;
    const int64_t batch = query_head / (size.num_queries * size.num_heads);
    const int64_t head_offset =
        (batch * size.num_keys * size.num_heads + head) * size.head_dims;
    const scalar_t* grad_output_head =
        grad_output + query_head * size.head_dims;
    const int64_t sample_offset = query_head * samples_per_head;
    const opmath_t* locations = sampling_locations + sample_offset * 2;
    const opmath_t* weights = attention_weights + sample_offset;

    for (int64_t level = 0; level < size.num_levels; ++level) {
      // As in the forward, a level that does not fit in the keys is a 0 x 0
      // map: its samples get zero gradients and write no grad_value.
      const int64_t start = level_start_index[level];
      const bool fits =
          level_fits(spatial_shapes[2 * level], spatial_shapes[2 * level + 1],
                     start, size.num_keys);
      const int64_t height = fits ? spatial_shapes[2 * level] : 0;
      const int64_t width = fits ? spatial_shapes[2 * level + 1] : 0;
      const int64_t level_offset =
          head_offset + (fits ? start : 0) * key_stride;
      for (int64_t point = 0; point < size.num_points; ++point) {
        const int64_t sample = level * size.num_points + point;
        const BilinearCorners<opmath_t> corners = locate_corners(
            locations[2 * sample], locations[2 * sample + 1], height, width);
        const opmath_t attention = weights[sample];
        // Per-lane partial sums over its channels of grad_output times the
        // sampled value and times its slopes along y and x.
        opmath_t partial_attention = opmath_t(0);
        opmath_t partial_y = opmath_t(0);
        opmath_t partial_x = opmath_t(0);
        if (corners.any_inside) {
          opmath_t by_y[4];
          opmath_t by_x[4];
          corner_weight_derivatives(corners, by_y, by_x);
          for (int64_t pack = first_pack; pack < packs_per_head;
               pack += group_size) {
            const int64_t channel = pack * kWidth;
            const ChannelPack<scalar_t, kWidth> grad_pack =
                load_pack<scalar_t, kWidth>(grad_output_head + channel);
#pragma unroll
            for (int corner = 0; corner < 4; ++corner) {
              if (corners.keys[corner] < 0) {
                continue;
              }
              const int64_t offset =
                  level_offset + corners.keys[corner] * key_stride + channel;
              const ChannelPack<scalar_t, kWidth> value_pack =
                  load_pack<scalar_t, kWidth>(value + offset);
              const opmath_t value_scale = attention * corners.weights[corner];
              opmath_t value_grads[kWidth];
#pragma unroll
              for (int lane_channel = 0; lane_channel < kWidth;
                   ++lane_channel) {
                const opmath_t grad =
                    static_cast<opmath_t>(grad_pack.channels[lane_channel]);
                const opmath_t grad_times_value =
                    grad *
                    static_cast<opmath_t>(value_pack.channels[lane_channel]);
                partial_attention +=
                    corners.weights[corner] * grad_times_value;
                partial_y += by_y[corner] * grad_times_value;
                partial_x += by_x[corner] * grad_times_value;
                value_grads[lane_channel] = value_scale * grad;
              }
              if constexpr (kScatterValueGrad) {
                atomic_add_channels<opmath_t, kWidth>(grad_value + offset,
                                                      value_grads);
              }
            }
          }
        }
        partial_attention = group_sum(partial_attention, group_size);
        partial_y = group_sum(partial_y, group_size);
        partial_x = group_sum(partial_x, group_size);
        if (active && lane == 0) {
          const int64_t sample_index = sample_offset + sample;
          grad_attention_weights[sample_index] = partial_attention;
          // pixel = location * size - 0.5, hence the factor size.
          grad_sampling_locations[2 * sample_index] =
              attention * partial_x * static_cast<opmath_t>(width);
          grad_sampling_locations[2 * sample_index + 1] =
              attention * partial_y * static_cast<opmath_t>(height);
        }
      }
    }
  }
}

}  // namespace cuda
}  // namespace ddetr_plugin
