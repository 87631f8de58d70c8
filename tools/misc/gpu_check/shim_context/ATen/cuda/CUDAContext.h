// Stand-in for ATen/cuda/CUDAContext.h, used only when the CUDA toolkit
// lacks the cuSPARSE and cuBLAS headers that the real one includes. mmcv 2.1.0's multi-scale deformable attention
// needs only the current stream; the torch headers it pulls in also use the
// device properties. Both are exported by libtorch_cuda with these
// signatures, so the declarations link against the real definitions.
#pragma once

#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

namespace at {
namespace cuda {

using c10::cuda::getCurrentCUDAStream;

TORCH_CUDA_CPP_API cudaDeviceProp *getCurrentDeviceProperties();
TORCH_CUDA_CPP_API cudaDeviceProp *getDeviceProperties(c10::DeviceIndex device);

} // namespace cuda
} // namespace at
