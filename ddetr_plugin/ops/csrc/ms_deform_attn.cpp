// Schema of the multi-scale deformable attention op and the Python module
// stub of the extension.
//
// The operators are declared once here; every backend registers its kernels
// in its own file (cpu/ms_deform_attn_cpu.cpp, cuda/*.cu) with
// TORCH_LIBRARY_IMPL. Autograd, fake (meta) kernels and input validation live
// in Python (ddetr_plugin/ops/ms_deform_attn.py), so torch.compile and
// torch.library.opcheck see one functional op per pass.
//
// Shapes (the Python front guarantees them, kernels only re-check cheaply):
//   value               (bs, num_keys, num_heads, head_dims)
//   spatial_shapes      (num_levels, 2) int64, (h, w) of every level
//   level_start_index   (num_levels,) int64, offset of each level in num_keys
//   sampling_locations  (bs, num_queries, num_heads, num_levels, num_points,
//                        2), normalised (x, y) in [0, 1]
//   attention_weights   (bs, num_queries, num_heads, num_levels, num_points)
//   output / grad_output (bs, num_queries, num_heads * head_dims)
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing ddetr_plugin._C only has to load the shared library so that the
// static TORCH_LIBRARY registrations run; the module itself is empty.
PyObject *PyInit__C(void) {
  static struct PyModuleDef module_definition = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Kernels of ddetr_plugin, reached through torch.ops.ddetr_plugin.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_definition);
}
}

TORCH_LIBRARY(ddetr_plugin, m) {
  // The fake kernels and the autograd formula are registered from this
  // Python module; torch imports it when it needs them.
  m.set_python_module("ddetr_plugin.ops.ms_deform_attn");
  m.def("ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, "
        "Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights) -> Tensor");
  // Returns (grad_value, grad_sampling_locations, grad_attention_weights).
  m.def("ms_deform_attn_backward(Tensor grad_output, Tensor value, "
        "Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights) "
        "-> (Tensor, Tensor, Tensor)");
}
