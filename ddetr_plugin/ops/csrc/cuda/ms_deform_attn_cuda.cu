// Host side of the CUDA multi-scale deformable attention: input checks,
// output allocation, launch configuration and the CUDA registration of the
// ddetr_plugin::ms_deform_attn_forward / _backward schemas, which are defined
// in ../ms_deform_attn.cpp. The kernels are in ms_deform_attn_kernels.cuh.
#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "ms_deform_attn_deterministic.cuh"
#include "ms_deform_attn_kernels.cuh"

namespace ddetr_plugin {
namespace cuda {
namespace {

void check_input(const at::Tensor& tensor, const char* name, int64_t dims,
                 const at::Tensor& value) {
  TORCH_CHECK(tensor.device() == value.device(),
              "ms_deform_attn (CUDA): expected ", name, " on ",
              value.device(), " like value, got ", tensor.device());
  TORCH_CHECK(tensor.dim() == dims, "ms_deform_attn (CUDA): expected ", name,
              " with ", dims, " dimensions, got shape ", tensor.sizes());
  TORCH_CHECK(tensor.is_contiguous(), "ms_deform_attn (CUDA): expected ",
              name, " contiguous, got strides ", tensor.strides(),
              " for shape ", tensor.sizes());
}

// Checks everything the kernels rely on that can be checked without reading
// device memory, and returns the problem size. That the levels described by
// spatial_shapes and level_start_index fit in value's keys needs their
// values: the Python front checks it, and the kernels skip any level that
// does not fit (level_fits), so no table reads or writes outside the
// tensors.
ProblemSize check_inputs(const at::Tensor& value,
                         const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index,
                         const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  TORCH_CHECK(value.is_cuda(),
              "ms_deform_attn (CUDA): expected value on a CUDA device, got ",
              value.device());
  check_input(value, "value", 4, value);
  check_input(spatial_shapes, "spatial_shapes", 2, value);
  check_input(level_start_index, "level_start_index", 1, value);
  check_input(sampling_locations, "sampling_locations", 6, value);
  check_input(attention_weights, "attention_weights", 5, value);

  const at::ScalarType opmath_dtype =
      at::toOpMathType(value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == opmath_dtype &&
                  attention_weights.scalar_type() == opmath_dtype,
              "ms_deform_attn (CUDA): expected sampling_locations and "
              "attention_weights of dtype ",
              opmath_dtype, " for value of dtype ", value.scalar_type(),
              ", got ", sampling_locations.scalar_type(), " and ",
              attention_weights.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn (CUDA): expected int64 spatial_shapes and "
              "level_start_index, got ",
              spatial_shapes.scalar_type(), " and ",
              level_start_index.scalar_type());

  ProblemSize size;
  size.batch_size = value.size(0);
  size.num_keys = value.size(1);
  size.num_heads = value.size(2);
  size.head_dims = value.size(3);
  size.num_queries = sampling_locations.size(1);
  size.num_levels = sampling_locations.size(3);
  size.num_points = sampling_locations.size(4);

  const std::vector<int64_t> locations_shape = {
      size.batch_size, size.num_queries, size.num_heads,
      size.num_levels, size.num_points, 2};
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef(locations_shape),
              "ms_deform_attn (CUDA): expected sampling_locations of shape ",
              at::IntArrayRef(locations_shape),
              " (batch, queries, heads, levels, points, 2) to match value ",
              value.sizes(), ", got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() ==
                  at::IntArrayRef(locations_shape).slice(0, 5),
              "ms_deform_attn (CUDA): expected attention_weights of shape ",
              at::IntArrayRef(locations_shape).slice(0, 5),
              " (batch, queries, heads, levels, points), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.size(0) == size.num_levels &&
                  spatial_shapes.size(1) == 2,
              "ms_deform_attn (CUDA): expected spatial_shapes of shape (",
              size.num_levels, ", 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.size(0) == size.num_levels,
              "ms_deform_attn (CUDA): expected level_start_index of shape (",
              size.num_levels, ",), got ", level_start_index.sizes());
  return size;
}

template <typename scalar_t, int kWidth>
void launch_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                    const at::Tensor& level_start_index,
                    const at::Tensor& sampling_locations,
                    const at::Tensor& attention_weights, at::Tensor& output,
                    const ProblemSize& size, cudaStream_t stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t num_threads = size.batch_size * size.num_queries *
                              size.num_heads * (size.head_dims / kWidth);
  ms_deform_attn_forward_kernel<scalar_t, kWidth>
      <<<num_blocks_for(num_threads), kThreadsPerBlock, 0, stream>>>(
          value.const_data_ptr<scalar_t>(),
          spatial_shapes.const_data_ptr<int64_t>(),
          level_start_index.const_data_ptr<int64_t>(),
          sampling_locations.const_data_ptr<opmath_t>(),
          attention_weights.const_data_ptr<opmath_t>(),
          output.mutable_data_ptr<scalar_t>(), size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value,
                                       const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const ProblemSize size =
      check_inputs(value, spatial_shapes, level_start_index,
                   sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor output = at::empty(
      {size.batch_size, size.num_queries, size.num_heads * size.head_dims},
      value.options());
  if (output.numel() == 0) {
    return output;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(),
      "ms_deform_attn_forward_cuda", [&] {
        const int width = forward_pack_width(
            size.head_dims, sizeof(scalar_t), value.const_data_ptr(),
            output.const_data_ptr());
        // Widths wider than 16 bytes are never chosen, so they are not
        // instantiated (8 channels only for 2-byte types, 4 not for double).
        if constexpr (sizeof(scalar_t) * 8 <= kMaxPackBytes) {
          if (width == 8) {
            launch_forward<scalar_t, 8>(value, spatial_shapes,
                                        level_start_index, sampling_locations,
                                        attention_weights, output, size,
                                        stream);
            return;
          }
        }
        if constexpr (sizeof(scalar_t) * 4 <= kMaxPackBytes) {
          if (width == 4) {
            launch_forward<scalar_t, 4>(value, spatial_shapes,
                                        level_start_index, sampling_locations,
                                        attention_weights, output, size,
                                        stream);
            return;
          }
        }
        if (width == 2) {
          launch_forward<scalar_t, 2>(value, spatial_shapes,
                                      level_start_index, sampling_locations,
                                      attention_weights, output, size, stream);
          return;
        }
        launch_forward<scalar_t, 1>(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights,
                                    output, size, stream);
      });
  return output;
}

// grad_value: the opmath_t accumulation buffer the kernel scatters into,
// or null with kScatterValueGrad false (deterministic mode).
template <typename scalar_t, int kWidth, bool kScatterValueGrad>
void launch_backward(const at::Tensor& grad_output, const at::Tensor& value,
                     const at::Tensor& spatial_shapes,
                     const at::Tensor& level_start_index,
                     const at::Tensor& sampling_locations,
                     const at::Tensor& attention_weights,
                     at::opmath_type<scalar_t>* grad_value,
                     at::Tensor& grad_sampling_locations,
                     at::Tensor& grad_attention_weights,
                     const ProblemSize& size, cudaStream_t stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int group_size = backward_group_size(size.head_dims, kWidth);
  const int64_t num_threads =
      size.batch_size * size.num_queries * size.num_heads * group_size;
  ms_deform_attn_backward_kernel<scalar_t, kWidth, kScatterValueGrad>
      <<<num_blocks_for(num_threads), kThreadsPerBlock, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(),
          value.const_data_ptr<scalar_t>(),
          spatial_shapes.const_data_ptr<int64_t>(),
          level_start_index.const_data_ptr<int64_t>(),
          sampling_locations.const_data_ptr<opmath_t>(),
          attention_weights.const_data_ptr<opmath_t>(), grad_value,
          grad_sampling_locations.mutable_data_ptr<opmath_t>(),
          grad_attention_weights.mutable_data_ptr<opmath_t>(), size,
          group_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Sorts `rows` (num_entries,) stably by their low `key_bits` bits and
// returns (sorted rows, entry at each sorted position). A radix sort (LSD)
// is stable; CUB's with a begin and end bit makes only the passes those
// bits need. DoubleBuffer: the two buffers of keys and of values are the
// sort's only large temporaries; CUB's own storage is a few histograms.
std::tuple<at::Tensor, at::Tensor> sort_rows(at::Tensor& rows, int key_bits,
                                             cudaStream_t stream) {
  const int64_t num_entries = rows.numel();
  at::Tensor entries = at::arange(num_entries, rows.options());
  at::Tensor rows_buffer = at::empty_like(rows);
  at::Tensor entries_buffer = at::empty_like(entries);
  // Non-negative int64 keys order like their uint64 bit patterns.
  const auto as_keys = [](at::Tensor& tensor) {
    return reinterpret_cast<uint64_t*>(tensor.mutable_data_ptr<int64_t>());
  };
  cub::DoubleBuffer<uint64_t> keys(as_keys(rows), as_keys(rows_buffer));
  cub::DoubleBuffer<int64_t> values(entries.mutable_data_ptr<int64_t>(),
                                    entries_buffer.mutable_data_ptr<int64_t>());
  size_t storage_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, storage_bytes, keys, values, num_entries, 0, key_bits,
      stream));
  // At least one byte: a null storage pointer would make the second call
  // another size query, which sorts nothing.
  at::Tensor storage =
      at::empty({std::max<int64_t>(static_cast<int64_t>(storage_bytes), 1)},
                rows.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      storage.mutable_data_ptr(), storage_bytes, keys, values, num_entries, 0,
      key_bits, stream));
  // The sort leaves its result in whichever buffer its last pass wrote.
  return std::make_tuple(keys.selector == 0 ? rows : rows_buffer,
                         values.selector == 0 ? entries : entries_buffer);
}

// The deterministic value gradient (ms_deform_attn_deterministic.cuh):
// corner rows, a stable sort by row, row segments, then one thread per
// grad_value element summing its segment in order. Writes all of
// grad_value, in the value's dtype. Scratch (docs/benchmarks.md): per entry
// its row and scale, the entry index and the sort's second buffers of both
// (36 bytes in float32, 40 in double), per value row 16 bytes (the rows
// searched for and their segment offsets), and CUB's histograms.
template <typename scalar_t>
void value_grad_by_gather(const at::Tensor& grad_output,
                          const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index,
                          const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights,
                          at::Tensor& grad_value, const ProblemSize& size,
                          const ValueGradPlan& plan, cudaStream_t stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::Tensor rows = at::empty({plan.num_entries},
                              sampling_locations.options().dtype(at::kLong));
  at::Tensor scales = at::empty({plan.num_entries},
                                sampling_locations.options());
  ms_deform_attn_corner_rows_kernel<opmath_t>
      <<<num_blocks_for(plan.num_entries), kThreadsPerBlock, 0, stream>>>(
          spatial_shapes.const_data_ptr<int64_t>(),
          level_start_index.const_data_ptr<int64_t>(),
          sampling_locations.const_data_ptr<opmath_t>(),
          attention_weights.const_data_ptr<opmath_t>(),
          rows.mutable_data_ptr<int64_t>(),
          scales.mutable_data_ptr<opmath_t>(), size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Stable: within a row, entries keep their increasing order, so the sum
  // order is fixed. (at::searchsorted is deterministic on CUDA.)
  const auto [sorted_rows, order] =
      sort_rows(rows, plan.sort_key_bits, stream);
  const at::Tensor row_offsets = at::searchsorted(
      sorted_rows, at::arange(plan.num_rows + 1, rows.options()));
  ms_deform_attn_value_grad_gather_kernel<scalar_t>
      <<<num_blocks_for(plan.num_items), kThreadsPerBlock, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(),
          row_offsets.const_data_ptr<int64_t>(),
          order.const_data_ptr<int64_t>(), scales.const_data_ptr<opmath_t>(),
          grad_value.mutable_data_ptr<scalar_t>(), size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value,
    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const ProblemSize size =
      check_inputs(value, spatial_shapes, level_start_index,
                   sampling_locations, attention_weights);
  check_input(grad_output, "grad_output", 3, value);
  const std::vector<int64_t> output_shape = {
      size.batch_size, size.num_queries, size.num_heads * size.head_dims};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(output_shape) &&
                  grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn (CUDA): expected grad_output of shape ",
              at::IntArrayRef(output_shape), " and dtype ",
              value.scalar_type(), ", got shape ", grad_output.sizes(),
              " and dtype ", grad_output.scalar_type());
  const c10::cuda::CUDAGuard device_guard(value.device());

  // Under torch.use_deterministic_algorithms(True) grad_value is gathered
  // (bitwise reproducible) and written whole in the value's dtype.
  // Otherwise it is scattered into with atomics, so it starts at zero, and
  // in opmath_t: half and bfloat16 gradients are summed in a float32
  // buffer and rounded once at the end (see the backward kernel). The other
  // two gradients are written once per sample by the backward kernel.
  const ValueGradPlan plan = plan_value_grad(
      size, at::globalContext().deterministicAlgorithms());
  const bool deterministic = plan.gather;
  const at::ScalarType opmath_dtype = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value =
      deterministic
          ? at::empty_like(value)
          : at::zeros(value.sizes(), value.options().dtype(opmath_dtype));
  at::Tensor grad_sampling_locations = at::empty_like(sampling_locations);
  at::Tensor grad_attention_weights = at::empty_like(attention_weights);
  const auto results = [&] {
    // A no-op for float and double and in deterministic mode, one rounding
    // of the accumulation buffer for half and bfloat16.
    return std::make_tuple(grad_value.to(value.scalar_type()),
                           grad_sampling_locations, grad_attention_weights);
  };
  if (grad_attention_weights.numel() == 0) {
    grad_value.zero_();  // no sample: nothing to gather or scatter
    return results();
  }
  if (size.head_dims == 0) {
    // Sums over zero channels.
    grad_sampling_locations.zero_();
    grad_attention_weights.zero_();
    return results();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(),
      "ms_deform_attn_backward_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        opmath_t* accumulator =
            deterministic ? nullptr : grad_value.mutable_data_ptr<opmath_t>();
        // Nothing to gather when grad_value is empty (no key): CUDA would
        // reject the gather's empty grid.
        if (deterministic && plan.num_items > 0) {
          value_grad_by_gather<scalar_t>(grad_output, spatial_shapes,
                                         level_start_index,
                                         sampling_locations,
                                         attention_weights, grad_value, size,
                                         plan, stream);
        }
        const int width = backward_pack_width(
            size.head_dims, sizeof(scalar_t), sizeof(opmath_t),
            grad_output.const_data_ptr(), value.const_data_ptr(),
            accumulator);
        const auto launch = [&](auto width_constant, auto scatter_constant) {
          launch_backward<scalar_t, decltype(width_constant)::value,
                          decltype(scatter_constant)::value>(
              grad_output, value, spatial_shapes, level_start_index,
              sampling_locations, attention_weights, accumulator,
              grad_sampling_locations, grad_attention_weights, size, stream);
        };
        using One = std::integral_constant<int, 1>;
        using Two = std::integral_constant<int, 2>;
        if (width == 2 && deterministic) {
          launch(Two{}, std::false_type{});
        } else if (width == 2) {
          launch(Two{}, std::true_type{});
        } else if (deterministic) {
          launch(One{}, std::false_type{});
        } else {
          launch(One{}, std::true_type{});
        }
      });
  return results();
}

}  // namespace

#define DDETR_CUDA_STRING(...) #__VA_ARGS__
#define DDETR_CUDA_EXPAND_STRING(...) DDETR_CUDA_STRING(__VA_ARGS__)

std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." +
         std::to_string(CUDART_VERSION % 1000 / 10);
}

std::string cuda_architectures() {
#ifdef __CUDA_ARCH_LIST__
  // nvcc (11.5 and later) lists the virtual architectures it compiles for,
  // e.g. 800,900.
  return DDETR_CUDA_EXPAND_STRING(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace cuda
}  // namespace ddetr_plugin

TORCH_LIBRARY_IMPL(ddetr_plugin, CUDA, m) {
  m.impl("ms_deform_attn_forward",
         &ddetr_plugin::cuda::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward",
         &ddetr_plugin::cuda::ms_deform_attn_backward_cuda);
}
