// Input checks of the CPU kernels of multi-scale deformable attention.
//
// The Python front (ddetr_plugin/ops/checks.py) validates every call with
// detailed messages; these checks guard the raw torch.ops entry points, which
// can be called directly, so that no input can make a kernel read or write
// out of bounds. Shapes as in ms_deform_attn_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ddetr_plugin {

// Raises (c10::Error, RuntimeError in Python) unless the inputs have the
// ranks, sizes, dtypes, device and contiguity the CPU kernels need and every
// level lies inside the keys of the value.
inline void check_cpu_inputs(const at::Tensor &value,
                             const at::Tensor &spatial_shapes,
                             const at::Tensor &level_start_index,
                             const at::Tensor &sampling_locations,
                             const at::Tensor &attention_weights) {
  TORCH_CHECK(value.dim() == 4,
              "ms_deform_attn: value must be (bs, num_keys, num_heads, "
              "head_dims), got ",
              value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 &&
                  sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (bs, num_queries, "
              "num_heads, num_levels, num_points, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() ==
                  sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be ",
              sampling_locations.sizes().slice(0, 5), ", got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 &&
                  spatial_shapes.size(0) == sampling_locations.size(3) &&
                  level_start_index.dim() == 1 &&
                  level_start_index.size(0) == spatial_shapes.size(0),
              "ms_deform_attn: spatial_shapes must be (num_levels, 2) and "
              "level_start_index (num_levels,), got ",
              spatial_shapes.sizes(), " and ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be "
              "int64, got ",
              spatial_shapes.scalar_type(), " and ",
              level_start_index.scalar_type());
  TORCH_CHECK(value.scalar_type() == sampling_locations.scalar_type() &&
                  value.scalar_type() == attention_weights.scalar_type(),
              "ms_deform_attn (CPU): value, sampling_locations and "
              "attention_weights must share one dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(),
              ", ", attention_weights.scalar_type());
  TORCH_CHECK(value.size(0) == sampling_locations.size(0) &&
                  value.size(2) == sampling_locations.size(2),
              "ms_deform_attn: value ", value.sizes(),
              " and sampling_locations ", sampling_locations.sizes(),
              " disagree on batch size or number of heads");
  for (const at::Tensor *tensor :
       {&value, &spatial_shapes, &level_start_index, &sampling_locations,
        &attention_weights}) {
    TORCH_CHECK(tensor->is_contiguous(),
                "ms_deform_attn: CPU kernel inputs must be contiguous");
    TORCH_CHECK(tensor->device().is_cpu(),
                "ms_deform_attn: CPU kernel got a tensor on ",
                tensor->device());
  }
  // The kernels index the value with these sizes: a level reaching past
  // the keys would read (and its gradient write) out of bounds. Written so
  // that no sum or product overflows, whatever the table holds.
  const int64_t *shapes = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t *starts = level_start_index.const_data_ptr<int64_t>();
  const int64_t num_keys = value.size(1);
  for (int64_t level = 0; level < spatial_shapes.size(0); ++level) {
    const int64_t height = shapes[2 * level], width = shapes[2 * level + 1];
    const int64_t start = starts[level];
    const bool fits = height >= 0 && width >= 0 && start >= 0 &&
                      start <= num_keys &&
                      (height == 0 || width <= (num_keys - start) / height);
    TORCH_CHECK(fits,
                "ms_deform_attn: level ", level, " of size (", height, ", ",
                width, ") starting at key ", starts[level],
                " does not fit in the ", value.size(1), " keys of value");
  }
}

// Whether the levels cover every key of the value exactly once, in order
// (the inputs having passed check_cpu_inputs, so every level fits).
inline bool levels_tile_keys(const at::Tensor &spatial_shapes,
                             const at::Tensor &level_start_index,
                             int64_t num_keys) {
  const int64_t *shapes = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t *starts = level_start_index.const_data_ptr<int64_t>();
  int64_t next_key = 0;
  for (int64_t level = 0; level < spatial_shapes.size(0); ++level) {
    if (starts[level] != next_key) {
      return false;
    }
    next_key += shapes[2 * level] * shapes[2 * level + 1];
  }
  return next_key == num_keys;
}

} // namespace ddetr_plugin
