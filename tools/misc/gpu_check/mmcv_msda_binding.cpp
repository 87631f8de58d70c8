// Registers mmcv 2.1.0's own CUDA multi-scale deformable attention as
// torch.ops.mmcv_msda.{forward,backward}, the baseline of the GPU check
// (tools/misc/gpu_check.sh). mmcv's kernel source (Apache-2.0) is not in
// this repository: gpu_check.sh takes it from the mmcv 2.1.0 source
// distribution into the ignored payload folder and compiles it with this
// file, without the rest of mmcv (whose Python side needs mmengine).
//
// Shapes as in mmcv: value (bs, num_keys, num_heads, channels),
// sampling_locations (bs, num_queries, num_heads, num_levels, num_points, 2)
// and attention_weights (bs, num_queries, num_heads, num_levels,
// num_points), all of value's dtype (float, double or half); im2col_step
// must divide bs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

// Defined in mmcv/ops/csrc/pytorch/cuda/ms_deform_attn_cuda.cu.
at::Tensor ms_deform_attn_cuda_forward(const at::Tensor &value,
                                       const at::Tensor &spatial_shapes,
                                       const at::Tensor &level_start_index,
                                       const at::Tensor &sampling_loc,
                                       const at::Tensor &attn_weight,
                                       const int im2col_step);

void ms_deform_attn_cuda_backward(
    const at::Tensor &value, const at::Tensor &spatial_shapes,
    const at::Tensor &level_start_index, const at::Tensor &sampling_loc,
    const at::Tensor &attn_weight, const at::Tensor &grad_output,
    at::Tensor &grad_value, at::Tensor &grad_sampling_loc,
    at::Tensor &grad_attn_weight, const int im2col_step);

namespace {

at::Tensor forward(const at::Tensor &value, const at::Tensor &spatial_shapes,
                   const at::Tensor &level_start_index,
                   const at::Tensor &sampling_locations,
                   const at::Tensor &attention_weights, int64_t im2col_step) {
  return ms_deform_attn_cuda_forward(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights,
                                     static_cast<int>(im2col_step));
}

// mmcv's backward adds into caller-supplied gradients, which its Python
// wrapper zeroes first; so does this one.
std::tuple<at::Tensor, at::Tensor, at::Tensor>
backward(const at::Tensor &value, const at::Tensor &spatial_shapes,
         const at::Tensor &level_start_index,
         const at::Tensor &sampling_locations,
         const at::Tensor &attention_weights, const at::Tensor &grad_output,
         int64_t im2col_step) {
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_locations = at::zeros_like(sampling_locations);
  at::Tensor grad_weights = at::zeros_like(attention_weights);
  ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index,
                               sampling_locations, attention_weights,
                               grad_output.contiguous(), grad_value,
                               grad_locations, grad_weights,
                               static_cast<int>(im2col_step));
  return {grad_value, grad_locations, grad_weights};
}

} // namespace

TORCH_LIBRARY(mmcv_msda, m) {
  m.def("forward(Tensor value, Tensor spatial_shapes, "
        "Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights, int im2col_step) -> Tensor");
  m.def("backward(Tensor value, Tensor spatial_shapes, "
        "Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights, Tensor grad_output, int im2col_step) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmcv_msda, CUDA, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
