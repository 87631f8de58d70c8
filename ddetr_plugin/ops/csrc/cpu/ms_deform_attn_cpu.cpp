// CPU kernels of multi-scale deformable attention, forward and backward.
//
// Semantics are those of mmcv's multi_scale_deformable_attn_pytorch
// (grid_sample, bilinear, zero padding, align_corners=False): a normalised
// location x in [0, 1] on a level of width w samples pixel column
// x * w - 0.5; a sample whose pixel coordinate is not inside [-1, size)
// reads zero, and a corner outside the map reads zero. At exactly -1 the
// sample reads zero but has a slope towards the map, which grid_sample
// counts, hence the closed bound (the CUDA kernels do the same). Comparisons
// are written so that NaN coordinates fail them and read zero too.
//
// Shape shorthand (as in ddetr_plugin/ops/reference.py):
//   bs batch size, nk keys, nq queries, nh heads, hd channels per head,
//   nl levels, np points per level.
//   value (bs, nk, nh, hd), locations (bs, nq, nh, nl, np, 2),
//   weights (bs, nq, nh, nl, np), output (bs, nq, nh * hd).
//
// With the value laid out (bs, nk, nh, hd), the hd channels of one head at
// one pixel are contiguous, so every bilinear corner is a contiguous run
// that the compiler vectorises. Indices are 64-bit throughout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/ms_deform_attn_cpu_checks.h"

namespace ddetr_plugin {
namespace {

// The hot loops are compiled for several x86 instruction sets and the best
// one the machine supports is picked when the library loads (GCC function
// multi-versioning), so the wheel stays portable yet uses AVX2/AVX-512.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) &&       \
    defined(__linux__)
#define DDETR_CPU_CLONES                                                       \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3",           \
                               "default")))
#else
#define DDETR_CPU_CLONES
#endif

// Helpers of the hot loops must be inlined into each clone to be compiled
// for its instruction set.
#if defined(__GNUC__)
#define DDETR_INLINE inline __attribute__((always_inline))
#define DDETR_PREFETCH(address) __builtin_prefetch(address)
#else
#define DDETR_INLINE inline
#define DDETR_PREFETCH(address) ((void)(address))
#endif

// One bilinear sample: the four corners as rows of hd channels and their
// interpolation weights. Corners outside the map point at a row of zeros
// with weight zero, so the channel loops need no branch.
template <typename scalar_t> struct BilinearSample {
  int64_t offsets[4]; // row offset of each corner in the value, or -1
  scalar_t weights[4];
  scalar_t low_y, low_x, high_y, high_x;
};

// Locates the corners of sampling pixel (x * width - 0.5, y * height - 0.5)
// in a level starting at key level_start. Returns false when the sample lies
// wholly outside the map (or is NaN) and contributes nothing.
template <typename scalar_t>
DDETR_INLINE bool locate_sample(scalar_t x, scalar_t y, int64_t height,
                                int64_t width, int64_t level_start,
                                int64_t num_heads, int64_t head,
                                int64_t head_dims,
                                BilinearSample<scalar_t> &sample) {
  const scalar_t pixel_y = y * static_cast<scalar_t>(height) - scalar_t(0.5);
  const scalar_t pixel_x = x * static_cast<scalar_t>(width) - scalar_t(0.5);
  if (!(pixel_y >= scalar_t(-1) && pixel_x >= scalar_t(-1) &&
        pixel_y < static_cast<scalar_t>(height) &&
        pixel_x < static_cast<scalar_t>(width))) {
    return false;
  }
  const int64_t y0 = static_cast<int64_t>(std::floor(pixel_y));
  const int64_t x0 = static_cast<int64_t>(std::floor(pixel_x));
  sample.low_y = pixel_y - static_cast<scalar_t>(y0);
  sample.low_x = pixel_x - static_cast<scalar_t>(x0);
  sample.high_y = scalar_t(1) - sample.low_y;
  sample.high_x = scalar_t(1) - sample.low_x;
  const bool top = y0 >= 0, bottom = y0 + 1 < height;
  const bool left = x0 >= 0, right = x0 + 1 < width;
  const bool inside[4] = {top && left, top && right, bottom && left,
                          bottom && right};
  const int64_t rows[4] = {y0, y0, y0 + 1, y0 + 1};
  const int64_t columns[4] = {x0, x0 + 1, x0, x0 + 1};
  const scalar_t weights[4] = {
      sample.high_y * sample.high_x, sample.high_y * sample.low_x,
      sample.low_y * sample.high_x, sample.low_y * sample.low_x};
  for (int corner = 0; corner < 4; ++corner) {
    if (inside[corner]) {
      const int64_t key = level_start + rows[corner] * width + columns[corner];
      sample.offsets[corner] = (key * num_heads + head) * head_dims;
      sample.weights[corner] = weights[corner];
    } else {
      sample.offsets[corner] = -1;
      sample.weights[corner] = scalar_t(0);
    }
  }
  return true;
}

// output[c] += sum over corners of weight * corner[c].
template <typename scalar_t>
DDETR_INLINE void accumulate_corners(scalar_t *__restrict__ output,
                                     const scalar_t *__restrict__ corner0,
                                     const scalar_t *__restrict__ corner1,
                                     const scalar_t *__restrict__ corner2,
                                     const scalar_t *__restrict__ corner3,
                                     const scalar_t *weights,
                                     int64_t head_dims) {
  const scalar_t w0 = weights[0], w1 = weights[1];
  const scalar_t w2 = weights[2], w3 = weights[3];
  for (int64_t c = 0; c < head_dims; ++c) {
    output[c] += w0 * corner0[c] + w1 * corner1[c] + w2 * corner2[c] +
                 w3 * corner3[c];
  }
}

// Hints the cache to fetch the first lines of a corner row early: samples
// land anywhere in the value, so their rows are rarely cached.
template <typename scalar_t>
DDETR_INLINE void prefetch_row(const scalar_t *row, int64_t head_dims) {
  constexpr int64_t line = 64;
  const int64_t bytes = head_dims * static_cast<int64_t>(sizeof(scalar_t));
  const char *start = reinterpret_cast<const char *>(row);
  for (int64_t offset = 0; offset < bytes && offset < 4 * line;
       offset += line) {
    DDETR_PREFETCH(start + offset);
  }
}

// Forward for the (batch, query) pairs [begin, end). Each (pair, head)
// first locates all its nl * np samples and prefetches their corner rows,
// then accumulates them: the memory requests of a whole block are in flight
// together instead of one sample at a time.
template <typename scalar_t>
DDETR_CPU_CLONES void
forward_range(int64_t begin, int64_t end, const scalar_t *value,
              const int64_t *spatial_shapes, const int64_t *level_start_index,
              const scalar_t *locations, const scalar_t *attention_weights,
              const scalar_t *zeros, scalar_t *output, int64_t num_keys,
              int64_t num_queries, int64_t num_heads, int64_t head_dims,
              int64_t num_levels, int64_t num_points) {
  const int64_t samples_per_head = num_levels * num_points;
  // Corner rows and their final weights of the samples of one (pair, head).
  std::vector<const scalar_t *> staged_rows(4 * samples_per_head);
  std::vector<scalar_t> staged_weights(4 * samples_per_head);
  BilinearSample<scalar_t> sample;
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t batch = pair / num_queries;
    const scalar_t *batch_value =
        value + batch * num_keys * num_heads * head_dims;
    scalar_t *output_row = output + pair * num_heads * head_dims;
    for (int64_t c = 0; c < num_heads * head_dims; ++c) {
      output_row[c] = scalar_t(0);
    }
    for (int64_t head = 0; head < num_heads; ++head) {
      // (pair, head) is the leading index of the (nl, np) sample block.
      const int64_t first_sample = (pair * num_heads + head) * samples_per_head;
      int64_t num_staged = 0;
      for (int64_t level = 0; level < num_levels; ++level) {
        const int64_t height = spatial_shapes[2 * level];
        const int64_t width = spatial_shapes[2 * level + 1];
        const int64_t level_start = level_start_index[level];
        for (int64_t point = 0; point < num_points; ++point) {
          const int64_t index = first_sample + level * num_points + point;
          if (!locate_sample(locations[2 * index], locations[2 * index + 1],
                             height, width, level_start, num_heads, head,
                             head_dims, sample)) {
            continue;
          }
          const scalar_t weight = attention_weights[index];
          for (int corner = 0; corner < 4; ++corner) {
            const int64_t offset = sample.offsets[corner];
            const scalar_t *row = offset < 0 ? zeros : batch_value + offset;
            if (offset >= 0) {
              prefetch_row(row, head_dims);
            }
            staged_rows[4 * num_staged + corner] = row;
            staged_weights[4 * num_staged + corner] =
                weight * sample.weights[corner];
          }
          ++num_staged;
        }
      }
      scalar_t *head_output = output_row + head * head_dims;
      for (int64_t staged = 0; staged < num_staged; ++staged) {
        const scalar_t *const *rows = &staged_rows[4 * staged];
        accumulate_corners(head_output, rows[0], rows[1], rows[2], rows[3],
                           &staged_weights[4 * staged], head_dims);
      }
    }
  }
}

// Gradients of one located sample: scatters into the grad_value rows of its
// corners and returns the sample's location and weight gradients.
template <typename scalar_t>
DDETR_INLINE void
backward_sample(const BilinearSample<scalar_t> &sample, scalar_t weight,
                scalar_t height, scalar_t width,
                const scalar_t *__restrict__ grad_row,
                const scalar_t *batch_value, scalar_t *batch_grad_value,
                const scalar_t *zeros, scalar_t *scratch, int64_t head_dims,
                scalar_t *grad_location, scalar_t *grad_weight) {
  const scalar_t *corners[4];
  scalar_t *grad_corners[4];
  for (int corner = 0; corner < 4; ++corner) {
    const int64_t offset = sample.offsets[corner];
    corners[corner] = offset < 0 ? zeros : batch_value + offset;
    // Corners outside the map write into their own scratch row, which is
    // never read.
    grad_corners[corner] = offset < 0 ? scratch + corner * head_dims
                                      : batch_grad_value + offset;
  }
  const scalar_t *__restrict__ v0 = corners[0];
  const scalar_t *__restrict__ v1 = corners[1];
  const scalar_t *__restrict__ v2 = corners[2];
  const scalar_t *__restrict__ v3 = corners[3];
  scalar_t *__restrict__ g0 = grad_corners[0];
  scalar_t *__restrict__ g1 = grad_corners[1];
  scalar_t *__restrict__ g2 = grad_corners[2];
  scalar_t *__restrict__ g3 = grad_corners[3];
  const scalar_t *w = sample.weights;
  const scalar_t s0 = weight * w[0], s1 = weight * w[1];
  const scalar_t s2 = weight * w[2], s3 = weight * w[3];
  // dot k = <grad_row, corner k>; grad of corner k += s k * grad_row.
  scalar_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
  for (int64_t c = 0; c < head_dims; ++c) {
    const scalar_t grad = grad_row[c];
    dot0 += grad * v0[c];
    dot1 += grad * v1[c];
    dot2 += grad * v2[c];
    dot3 += grad * v3[c];
    g0[c] += s0 * grad;
    g1[c] += s1 * grad;
    g2[c] += s2 * grad;
    g3[c] += s3 * grad;
  }
  *grad_weight = w[0] * dot0 + w[1] * dot1 + w[2] * dot2 + w[3] * dot3;
  // d(pixel)/d(location) is the level size; between the corners the
  // interpolated value is linear in each pixel coordinate.
  grad_location[0] = weight * width *
                     (sample.high_y * (dot1 - dot0) +
                      sample.low_y * (dot3 - dot2));
  grad_location[1] = weight * height *
                     (sample.high_x * (dot2 - dot0) +
                      sample.low_x * (dot3 - dot1));
}

// Backward for one task: the levels [level_begin, level_end) of one head of
// one image. Tasks own disjoint slices of grad_value (those levels' keys of
// that head of that image, when the levels tile the keys; otherwise each
// task holds all the levels of its head), so they run in parallel without
// atomics or per-thread copies of grad_value; their location and weight
// gradients are disjoint as well. zero_slice: the task zeroes its levels'
// keys first (only when the levels tile the keys: overlapping levels would
// zero each other's sums). Within a task the queries are walked in order and, for
// each, its levels and points, so the grad_output row and the locations and
// weights of a (query, head) are read once, from consecutive memory.
// (Staging and prefetching samples as the forward does made this loop
// slower.)
template <typename scalar_t>
DDETR_CPU_CLONES void backward_task(
    int64_t batch, int64_t head, int64_t level_begin, int64_t level_end,
    bool zero_slice, const scalar_t *grad_output, const scalar_t *value,
    const int64_t *spatial_shapes, const int64_t *level_start_index,
    const scalar_t *locations, const scalar_t *attention_weights,
    const scalar_t *zeros, scalar_t *scratch, scalar_t *grad_value,
    scalar_t *grad_locations, scalar_t *grad_attention_weights,
    int64_t num_keys, int64_t num_queries, int64_t num_heads,
    int64_t head_dims, int64_t num_levels, int64_t num_points) {
  const int64_t batch_offset = batch * num_keys * num_heads * head_dims;
  const scalar_t *batch_value = value + batch_offset;
  scalar_t *batch_grad_value = grad_value + batch_offset;
  // The task zeroes its own slice of grad_value: no separate pass over the
  // whole tensor, and the pages are first touched by the thread that
  // accumulates into them.
  for (int64_t level = level_begin; zero_slice && level < level_end;
       ++level) {
    const int64_t level_start = level_start_index[level];
    const int64_t level_size = spatial_shapes[2 * level] *
                               spatial_shapes[2 * level + 1];
    for (int64_t key = level_start; key < level_start + level_size; ++key) {
      scalar_t *grad_row =
          batch_grad_value + (key * num_heads + head) * head_dims;
      for (int64_t c = 0; c < head_dims; ++c) {
        grad_row[c] = scalar_t(0);
      }
    }
  }
  BilinearSample<scalar_t> sample;
  for (int64_t query = 0; query < num_queries; ++query) {
    const int64_t row = (batch * num_queries + query) * num_heads + head;
    const scalar_t *grad_row = grad_output + row * head_dims;
    for (int64_t level = level_begin; level < level_end; ++level) {
      const int64_t height = spatial_shapes[2 * level];
      const int64_t width = spatial_shapes[2 * level + 1];
      const int64_t level_start = level_start_index[level];
      for (int64_t point = 0; point < num_points; ++point) {
        const int64_t index = (row * num_levels + level) * num_points + point;
        if (!locate_sample(locations[2 * index], locations[2 * index + 1],
                           height, width, level_start, num_heads, head,
                           head_dims, sample)) {
          grad_locations[2 * index] = scalar_t(0);
          grad_locations[2 * index + 1] = scalar_t(0);
          grad_attention_weights[index] = scalar_t(0);
          continue;
        }
        backward_sample(sample, attention_weights[index],
                        static_cast<scalar_t>(height),
                        static_cast<scalar_t>(width), grad_row, batch_value,
                        batch_grad_value, zeros, scratch, head_dims,
                        grad_locations + 2 * index,
                        grad_attention_weights + index);
      }
    }
  }
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor &value,
                                      const at::Tensor &spatial_shapes,
                                      const at::Tensor &level_start_index,
                                      const at::Tensor &sampling_locations,
                                      const at::Tensor &attention_weights) {
  check_cpu_inputs(value, spatial_shapes, level_start_index,
                   sampling_locations, attention_weights);
  const int64_t batch_size = value.size(0), num_keys = value.size(1);
  const int64_t num_heads = value.size(2), head_dims = value.size(3);
  const int64_t num_queries = sampling_locations.size(1);
  const int64_t num_levels = sampling_locations.size(3);
  const int64_t num_points = sampling_locations.size(4);
  at::Tensor output = at::empty(
      {batch_size, num_queries, num_heads * head_dims}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(
      value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        const std::vector<scalar_t> zeros(head_dims, scalar_t(0));
        const scalar_t *value_data = value.const_data_ptr<scalar_t>();
        const int64_t *shapes = spatial_shapes.const_data_ptr<int64_t>();
        const int64_t *starts = level_start_index.const_data_ptr<int64_t>();
        const scalar_t *locations =
            sampling_locations.const_data_ptr<scalar_t>();
        const scalar_t *weights = attention_weights.const_data_ptr<scalar_t>();
        scalar_t *output_data = output.mutable_data_ptr<scalar_t>();
        // A chunk of about 16 queries amortises the scheduling.
        at::parallel_for(
            0, batch_size * num_queries, 16, [&](int64_t begin, int64_t end) {
              forward_range<scalar_t>(begin, end, value_data, shapes, starts,
                                      locations, weights, zeros.data(),
                                      output_data, num_keys, num_queries,
                                      num_heads, head_dims, num_levels,
                                      num_points);
            });
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor &grad_output, const at::Tensor &value,
    const at::Tensor &spatial_shapes, const at::Tensor &level_start_index,
    const at::Tensor &sampling_locations,
    const at::Tensor &attention_weights) {
  check_cpu_inputs(value, spatial_shapes, level_start_index,
                   sampling_locations, attention_weights);
  const int64_t batch_size = value.size(0), num_keys = value.size(1);
  const int64_t num_heads = value.size(2), head_dims = value.size(3);
  const int64_t num_queries = sampling_locations.size(1);
  const int64_t num_levels = sampling_locations.size(3);
  const int64_t num_points = sampling_locations.size(4);
  TORCH_CHECK(grad_output.is_contiguous() &&
                  grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.dim() == 3 &&
                  grad_output.size(0) == batch_size &&
                  grad_output.size(1) == num_queries &&
                  grad_output.size(2) == num_heads * head_dims,
              "ms_deform_attn: grad_output must be a contiguous (",
              batch_size, ", ", num_queries, ", ", num_heads * head_dims,
              ") tensor of ", value.scalar_type(), ", got ",
              grad_output.sizes(), " ", grad_output.scalar_type());
  // Every element of the three gradients is written by the kernel below
  // (grad_value zeroed slice by slice, as the levels tile the keys).
  at::Tensor grad_value = at::empty_like(value);
  at::Tensor grad_locations = at::empty_like(sampling_locations);
  at::Tensor grad_weights = at::empty_like(attention_weights);
  const bool tiled =
      levels_tile_keys(spatial_shapes, level_start_index, num_keys);
  if (!tiled) {
    // Keys outside every level get no gradient and no zeroing pass, and
    // keys in several levels gather from all of them.
    grad_value.zero_();
  }
  if (grad_weights.numel() == 0) {
    grad_value.zero_();
    grad_locations.zero_();
    return {grad_value, grad_locations, grad_weights};
  }
  AT_DISPATCH_FLOATING_TYPES(
      value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
        const std::vector<scalar_t> zeros(head_dims, scalar_t(0));
        const scalar_t *grad_data = grad_output.const_data_ptr<scalar_t>();
        const scalar_t *value_data = value.const_data_ptr<scalar_t>();
        const int64_t *shapes = spatial_shapes.const_data_ptr<int64_t>();
        const int64_t *starts = level_start_index.const_data_ptr<int64_t>();
        const scalar_t *locations =
            sampling_locations.const_data_ptr<scalar_t>();
        const scalar_t *weights = attention_weights.const_data_ptr<scalar_t>();
        scalar_t *grad_value_data = grad_value.mutable_data_ptr<scalar_t>();
        scalar_t *grad_locations_data =
            grad_locations.mutable_data_ptr<scalar_t>();
        scalar_t *grad_weights_data = grad_weights.mutable_data_ptr<scalar_t>();
        // One task per (image, head) when that keeps every thread busy;
        // otherwise the levels are split too, at the cost of reading each
        // grad_output row once per level group.
        // Levels that do not tile the keys may overlap: then one task holds
        // all the levels of its head, so no two tasks write the same keys.
        const int64_t num_pairs = batch_size * num_heads;
        const int64_t num_groups =
            !tiled ? 1
                   : std::min<int64_t>(
                         num_levels,
                         (at::get_num_threads() + num_pairs - 1) /
                             std::max<int64_t>(num_pairs, 1));
        const int64_t levels_per_group =
            (num_levels + num_groups - 1) / num_groups;
        at::parallel_for(
            0, num_pairs * num_groups, 1, [&](int64_t begin, int64_t end) {
              std::vector<scalar_t> scratch(4 * head_dims);
              for (int64_t task = begin; task < end; ++task) {
                const int64_t group = task % num_groups;
                const int64_t head = (task / num_groups) % num_heads;
                const int64_t batch = task / (num_groups * num_heads);
                const int64_t level_begin = group * levels_per_group;
                const int64_t level_end =
                    std::min(level_begin + levels_per_group, num_levels);
                backward_task<scalar_t>(
                    batch, head, level_begin, level_end, tiled, grad_data,
                    value_data, shapes, starts, locations, weights,
                    zeros.data(), scratch.data(), grad_value_data,
                    grad_locations_data, grad_weights_data, num_keys,
                    num_queries, num_heads, head_dims, num_levels,
                    num_points);
              }
            });
      });
  return {grad_value, grad_locations, grad_weights};
}

} // namespace

TORCH_LIBRARY_IMPL(ddetr_plugin, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

} // namespace ddetr_plugin
