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
#include <torch/version.h>

#include <string>

#ifdef WITH_CUDA
namespace ddetr_plugin {
namespace cuda {
// Defined in cuda/ms_deform_attn_cuda.cu: the CUDA runtime version and the
// architectures nvcc compiled the kernels for.
std::string cuda_version();
std::string cuda_architectures();
} // namespace cuda
} // namespace ddetr_plugin
#endif

namespace {

#define DDETR_STRING(x) #x
#define DDETR_EXPAND_STRING(x) DDETR_STRING(x)

// _C.build_info() -> dict: how this extension was built, for
// `python -m ddetr_plugin.ops.check`. torch: the version whose headers it
// was compiled against; cuda: the CUDA version of its kernels, or None
// without them; cuda_architectures: e.g. "800,900", or None.
PyObject *build_info(PyObject *, PyObject *) {
  const char *torch_version = DDETR_EXPAND_STRING(TORCH_VERSION_MAJOR) "."
      DDETR_EXPAND_STRING(TORCH_VERSION_MINOR) "."
          DDETR_EXPAND_STRING(TORCH_VERSION_PATCH);
#ifdef WITH_CUDA
  const std::string version = ddetr_plugin::cuda::cuda_version();
  const std::string architectures = ddetr_plugin::cuda::cuda_architectures();
  return Py_BuildValue("{s:s, s:s, s:s}", "torch", torch_version, "cuda",
                       version.c_str(), "cuda_architectures",
                       architectures.c_str());
#else
  return Py_BuildValue("{s:s, s:O, s:O}", "torch", torch_version, "cuda",
                       Py_None, "cuda_architectures", Py_None);
#endif
}

PyMethodDef module_methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "How the extension was built: torch headers, CUDA version and "
     "architectures."},
    {nullptr, nullptr, 0, nullptr},
};

} // namespace

extern "C" {
// Importing ddetr_plugin._C loads the shared library so that the static
// TORCH_LIBRARY registrations run; the module itself only says how it was
// built.
PyObject *PyInit__C(void) {
  static struct PyModuleDef module_definition = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Kernels of ddetr_plugin, reached through torch.ops.ddetr_plugin.",
      -1,
      module_methods,
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
