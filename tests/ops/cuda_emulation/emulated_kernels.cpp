// Runs the CUDA kernels of ddetr_plugin/ops/csrc/cuda on the CPU.
//
// The kernel source is compiled unchanged by a host compiler, with
// cuda_shim.h force-included and include/ holding stand-ins for
// <cuda_fp16.h> and <cuda_bf16.h>. The launch configuration (block and grid
// sizes, channel pack widths, backward lane groups) comes from the same
// ms_deform_attn_launch_config.h as the real launcher, so the emulation
// takes the launcher's decisions for the given pointers and sizes. Only the
// at::Tensor glue of ms_deform_attn_cuda.cu (checks, allocation) is not
// exercised: the caller allocates, zeroes grad_value's float accumulation
// buffer and rounds it to the value's dtype, as that glue does.
//
// This checks indexing, packing, grid-stride loops, lane groups and their
// shuffle reductions, and half-precision rounding. It cannot check what only
// hardware shows: memory ordering, races between warps running at once,
// register pressure, or speed.
//
// C interface (for ctypes): every function returns 0 on success, else
// writes a message into `error` and returns 1.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "ms_deform_attn_deterministic.cuh"
#include "ms_deform_attn_kernels.cuh"

namespace {

using ddetr_plugin::cuda::kMaxPackBytes;
using ddetr_plugin::cuda::kThreadsPerBlock;
using ddetr_plugin::cuda::kWarpSize;
using ddetr_plugin::cuda::ProblemSize;

enum DtypeCode { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Order in which the driver runs blocks, warps and lanes: kFirstToLast,
// kLastToFirst, or any other value as the seed of a shuffle of all three.
constexpr int64_t kFirstToLast = 0;
constexpr int64_t kLastToFirst = -1;

// 0..count-1 in the given order.
std::vector<int64_t> run_order(int64_t count, int64_t order,
                               std::mt19937_64& random) {
  std::vector<int64_t> indices(count);
  std::iota(indices.begin(), indices.end(), int64_t(0));
  if (order == kLastToFirst) {
    std::reverse(indices.begin(), indices.end());
  } else if (order != kFirstToLast) {
    std::shuffle(indices.begin(), indices.end(), random);
  }
  return indices;
}

// Runs `kernel` (a callable with no arguments, the kernel bound to its
// arguments) on a grid of num_blocks blocks of kThreadsPerBlock threads,
// one warp after the other (see cuda_shim.h), blocks, warps and lanes in
// the given order. Returns an error message, empty on success.
std::string launch(const std::function<void()>& kernel, int64_t num_blocks,
                   int64_t order = kFirstToLast) {
  gridDim = uint3{static_cast<unsigned int>(num_blocks), 1, 1};
  blockDim = uint3{static_cast<unsigned int>(kThreadsPerBlock), 1, 1};
  cuda_emulation::Warp warp;
  constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
  std::mt19937_64 random(static_cast<uint64_t>(order));
  for (const int64_t block : run_order(num_blocks, order, random)) {
    blockIdx = uint3{static_cast<unsigned int>(block), 0, 0};
    for (const int64_t warp_index : run_order(kWarpsPerBlock, order, random)) {
      int lane_order[kWarpSize];
      const std::vector<int64_t> lanes = run_order(kWarpSize, order, random);
      std::copy(lanes.begin(), lanes.end(), lane_order);
      const std::string error =
          warp.run(kernel, static_cast<int>(warp_index), lane_order);
      if (!error.empty()) {
        return "block " + std::to_string(block) + ", warp " +
               std::to_string(warp_index) + ": " + error;
      }
    }
  }
  return "";
}

// How the emulation departs from the launcher's plain launch.
struct LaunchOptions {
  // > 0: cap the launcher's grid, so that the grid-stride loops iterate.
  int64_t max_blocks;
  // kFirstToLast, kLastToFirst or a shuffle seed (see launch()).
  int64_t order;
};

// Launches `kernel` for num_threads threads on the launcher's grid, as
// modified by `options`.
std::string launch_for(const std::function<void()>& kernel,
                       int64_t num_threads, const LaunchOptions& options) {
  int64_t blocks = ddetr_plugin::cuda::num_blocks_for(num_threads);
  if (options.max_blocks > 0 && blocks > options.max_blocks) {
    blocks = options.max_blocks;
  }
  return launch(kernel, blocks, options.order);
}

ProblemSize problem_size(const int64_t* sizes) {
  ProblemSize size;
  size.batch_size = sizes[0];
  size.num_keys = sizes[1];
  size.num_queries = sizes[2];
  size.num_heads = sizes[3];
  size.head_dims = sizes[4];
  size.num_levels = sizes[5];
  size.num_points = sizes[6];
  return size;
}

template <typename scalar_t, int kWidth>
std::string run_forward(const void* value, const int64_t* spatial_shapes,
                        const int64_t* level_start_index,
                        const void* sampling_locations,
                        const void* attention_weights, void* output,
                        const ProblemSize& size, const LaunchOptions& options) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t num_threads = size.batch_size * size.num_queries *
                              size.num_heads * (size.head_dims / kWidth);
  const auto kernel = [&] {
    ddetr_plugin::cuda::ms_deform_attn_forward_kernel<scalar_t, kWidth>(
        static_cast<const scalar_t*>(value), spatial_shapes,
        level_start_index, static_cast<const opmath_t*>(sampling_locations),
        static_cast<const opmath_t*>(attention_weights),
        static_cast<scalar_t*>(output), size);
  };
  return launch_for(kernel, num_threads, options);
}

template <typename scalar_t>
std::string forward(const void* value, const int64_t* spatial_shapes,
                    const int64_t* level_start_index,
                    const void* sampling_locations,
                    const void* attention_weights, void* output,
                    const ProblemSize& size, const LaunchOptions& options,
                    int* width_used) {
  const int width = ddetr_plugin::cuda::forward_pack_width(
      size.head_dims, sizeof(scalar_t), value, output);
  *width_used = width;
  if constexpr (sizeof(scalar_t) * 8 <= kMaxPackBytes) {
    if (width == 8) {
      return run_forward<scalar_t, 8>(value, spatial_shapes,
                                      level_start_index, sampling_locations,
                                      attention_weights, output, size,
                                      options);
    }
  }
  if constexpr (sizeof(scalar_t) * 4 <= kMaxPackBytes) {
    if (width == 4) {
      return run_forward<scalar_t, 4>(value, spatial_shapes,
                                      level_start_index, sampling_locations,
                                      attention_weights, output, size,
                                      options);
    }
  }
  if (width == 2) {
    return run_forward<scalar_t, 2>(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights,
                                    output, size, options);
  }
  if (width != 1) {
    return "forward_pack_width chose " + std::to_string(width) +
           " channels, wider than 16 bytes";
  }
  return run_forward<scalar_t, 1>(value, spatial_shapes, level_start_index,
                                  sampling_locations, attention_weights,
                                  output, size, options);
}

template <typename scalar_t, int kWidth, bool kScatterValueGrad>
std::string run_backward(const void* grad_output, const void* value,
                         const int64_t* spatial_shapes,
                         const int64_t* level_start_index,
                         const void* sampling_locations,
                         const void* attention_weights, void* grad_value,
                         void* grad_sampling_locations,
                         void* grad_attention_weights,
                         const ProblemSize& size, const LaunchOptions& options,
                         int* group_size_used) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int group_size =
      ddetr_plugin::cuda::backward_group_size(size.head_dims, kWidth);
  *group_size_used = group_size;
  const int64_t num_threads =
      size.batch_size * size.num_queries * size.num_heads * group_size;
  const auto kernel = [&] {
    ddetr_plugin::cuda::ms_deform_attn_backward_kernel<scalar_t, kWidth,
                                                       kScatterValueGrad>(
        static_cast<const scalar_t*>(grad_output),
        static_cast<const scalar_t*>(value), spatial_shapes,
        level_start_index, static_cast<const opmath_t*>(sampling_locations),
        static_cast<const opmath_t*>(attention_weights),
        static_cast<opmath_t*>(grad_value),
        static_cast<opmath_t*>(grad_sampling_locations),
        static_cast<opmath_t*>(grad_attention_weights), size, group_size);
  };
  return launch_for(kernel, num_threads, options);
}

// scatter_value_grad false: grad_value is left alone (may be null), as in
// the deterministic backward.
template <typename scalar_t>
std::string backward(const void* grad_output, const void* value,
                     const int64_t* spatial_shapes,
                     const int64_t* level_start_index,
                     const void* sampling_locations,
                     const void* attention_weights, void* grad_value,
                     void* grad_sampling_locations,
                     void* grad_attention_weights, const ProblemSize& size,
                     const LaunchOptions& options, bool scatter_value_grad,
                     int* width_used, int* group_size_used) {
  const int width = ddetr_plugin::cuda::backward_pack_width(
      size.head_dims, sizeof(scalar_t), sizeof(at::opmath_type<scalar_t>),
      grad_output, value, grad_value);
  *width_used = width;
  const auto run = [&](auto width_constant, auto scatter_constant) {
    return run_backward<scalar_t, decltype(width_constant)::value,
                        decltype(scatter_constant)::value>(
        grad_output, value, spatial_shapes, level_start_index,
        sampling_locations, attention_weights, grad_value,
        grad_sampling_locations, grad_attention_weights, size, options,
        group_size_used);
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  if (width == 2) {
    return scatter_value_grad ? run(Two{}, std::true_type{})
                              : run(Two{}, std::false_type{});
  }
  return scatter_value_grad ? run(One{}, std::true_type{})
                            : run(One{}, std::false_type{});
}

// Step 1 of the deterministic value gradient: rows and scales of every
// (query head, sample, corner) entry.
template <typename scalar_t>
std::string corner_rows(const int64_t* spatial_shapes,
                        const int64_t* level_start_index,
                        const void* sampling_locations,
                        const void* attention_weights, int64_t* rows,
                        void* scales, const ProblemSize& size,
                        const LaunchOptions& options) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t num_entries = size.batch_size * size.num_queries *
                              size.num_heads * size.num_levels *
                              size.num_points * 4;
  const auto kernel = [&] {
    ddetr_plugin::cuda::ms_deform_attn_corner_rows_kernel<opmath_t>(
        spatial_shapes, level_start_index,
        static_cast<const opmath_t*>(sampling_locations),
        static_cast<const opmath_t*>(attention_weights), rows,
        static_cast<opmath_t*>(scales), size);
  };
  return launch_for(kernel, num_entries, options);
}

// Step 3: the gather over the sorted entries (the caller sorts, as the
// launcher does with at::sort and at::searchsorted).
template <typename scalar_t>
std::string value_grad_gather(const void* grad_output,
                              const int64_t* row_offsets,
                              const int64_t* order, const void* scales,
                              void* grad_value, const ProblemSize& size,
                              const LaunchOptions& options) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t num_items =
      size.batch_size * size.num_keys * size.num_heads * size.head_dims;
  const auto kernel = [&] {
    ddetr_plugin::cuda::ms_deform_attn_value_grad_gather_kernel<scalar_t>(
        static_cast<const scalar_t*>(grad_output), row_offsets, order,
        static_cast<const opmath_t*>(scales),
        static_cast<scalar_t*>(grad_value), size);
  };
  return launch_for(kernel, num_items, options);
}

int report(const std::string& message, char* error, int64_t error_size) {
  if (message.empty()) return 0;
  std::snprintf(error, static_cast<size_t>(error_size), "%s",
                message.c_str());
  return 1;
}

// Calls function(scalar_t{}) with the C++ type of the dtype code; returns
// its error message.
template <typename Function>
std::string dispatch(int dtype, const Function& function) {
  switch (dtype) {
    case kFloat64:
      return function(double{});
    case kFloat32:
      return function(float{});
    case kFloat16:
      return function(c10::Half{});
    case kBFloat16:
      return function(c10::BFloat16{});
    default:
      return "unknown dtype code " + std::to_string(dtype) +
             " (expected 0 float64, 1 float32, 2 float16, 3 bfloat16)";
  }
}

}  // namespace

extern "C" {

// sizes: batch_size, num_keys, num_queries, num_heads, head_dims,
// num_levels, num_points. max_blocks > 0 caps the grid; order 0 runs
// blocks, warps and lanes first to last, -1 last to first, anything else
// shuffled with that seed. On return, *width_used holds the
// channels per thread the launcher's rule chose.
int emulate_forward(int dtype, const void* value,
                    const int64_t* spatial_shapes,
                    const int64_t* level_start_index,
                    const void* sampling_locations,
                    const void* attention_weights, void* output,
                    const int64_t* sizes, int64_t max_blocks, int64_t order,
                    int* width_used, char* error, int64_t error_size) {
  const ProblemSize size = problem_size(sizes);
  const LaunchOptions options{max_blocks, order};
  const std::string message = dispatch(dtype, [&](auto type) {
    return forward<decltype(type)>(value, spatial_shapes, level_start_index,
                                   sampling_locations, attention_weights,
                                   output, size, options, width_used);
  });
  return report(message, error, error_size);
}

// grad_value is the launcher's accumulation buffer: zeroed by the caller,
// of at::opmath_type of the value's dtype (float32 for half types), which
// the caller rounds to the value's dtype afterwards. Options as for
// emulate_forward. On return,
// *width_used holds the channels per lane and *group_size_used the lanes
// per query head that the launcher's rules chose.
int emulate_backward(int dtype, const void* grad_output, const void* value,
                     const int64_t* spatial_shapes,
                     const int64_t* level_start_index,
                     const void* sampling_locations,
                     const void* attention_weights, void* grad_value,
                     void* grad_sampling_locations,
                     void* grad_attention_weights, const int64_t* sizes,
                     int64_t max_blocks, int64_t order,
                     int scatter_value_grad, int* width_used,
                     int* group_size_used, char* error, int64_t error_size) {
  const ProblemSize size = problem_size(sizes);
  const LaunchOptions options{max_blocks, order};
  const std::string message = dispatch(dtype, [&](auto type) {
    return backward<decltype(type)>(
        grad_output, value, spatial_shapes, level_start_index,
        sampling_locations, attention_weights, grad_value,
        grad_sampling_locations, grad_attention_weights, size, options,
        scatter_value_grad != 0, width_used, group_size_used);
  });
  return report(message, error, error_size);
}

// The deterministic value gradient's kernels (see
// ms_deform_attn_deterministic.cuh); dtype is the value's, scales are of
// its opmath type. Options as for emulate_forward.
int emulate_corner_rows(int dtype, const int64_t* spatial_shapes,
                        const int64_t* level_start_index,
                        const void* sampling_locations,
                        const void* attention_weights, int64_t* rows,
                        void* scales, const int64_t* sizes,
                        int64_t max_blocks, int64_t order, char* error,
                        int64_t error_size) {
  const ProblemSize size = problem_size(sizes);
  const LaunchOptions options{max_blocks, order};
  const std::string message = dispatch(dtype, [&](auto type) {
    return corner_rows<decltype(type)>(spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights,
                                       rows, scales, size, options);
  });
  return report(message, error, error_size);
}

int emulate_value_grad_gather(int dtype, const void* grad_output,
                              const int64_t* row_offsets,
                              const int64_t* sorted_entries,
                              const void* scales, void* grad_value,
                              const int64_t* sizes, int64_t max_blocks,
                              int64_t order, char* error,
                              int64_t error_size) {
  const ProblemSize size = problem_size(sizes);
  const LaunchOptions options{max_blocks, order};
  const std::string message = dispatch(dtype, [&](auto type) {
    return value_grad_gather<decltype(type)>(grad_output, row_offsets,
                                             sorted_entries, scales,
                                             grad_value, size, options);
  });
  return report(message, error, error_size);
}

// Runs a kernel whose first lane returns before a full-mask shuffle that
// the other lanes reach; the emulation must report it (returns 1).
int emulate_divergent_shuffle_probe(char* error, int64_t error_size) {
  const auto kernel = [] {
    if (threadIdx.x % kWarpSize == 0) return;
    __shfl_xor_sync(0xffffffffu, 1.0f, 1, kWarpSize);
  };
  return report(launch(kernel, 1), error, error_size);
}

}  // extern "C"
