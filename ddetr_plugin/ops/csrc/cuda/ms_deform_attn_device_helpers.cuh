// Device helpers of the multi-scale deformable attention CUDA kernels:
// packed channel loads, bilinear corner lookup, packed atomics and group
// reductions. The kernels themselves live in ms_deform_attn_kernels.cuh.
//
// Types used throughout:
//   scalar_t  the dtype of value, output, grad_output and grad_value
//             (double, float, c10::Half or c10::BFloat16).
//   opmath_t  at::opmath_type<scalar_t>: float for float, half and bfloat16,
//             double for double. Sampling locations, attention weights, all
//             coordinates and every accumulation use it, grad_value's
//             atomics included, so half-precision inputs never accumulate in
//             half precision.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace ddetr_plugin {
namespace cuda {

// kWidth consecutive channels of one (batch, key, head) row, read or written
// with a single vector instruction. The alignment is what lets the compiler
// emit that instruction; the launcher only picks kWidth > 1 when head_dims is
// a multiple of kWidth and the base pointers are aligned to the whole pack.
template <typename scalar_t, int kWidth>
struct alignas(sizeof(scalar_t) * kWidth) ChannelPack {
  scalar_t channels[kWidth];
};

template <typename scalar_t, int kWidth>
__device__ __forceinline__ ChannelPack<scalar_t, kWidth> load_pack(
    const scalar_t* address) {
  return *reinterpret_cast<const ChannelPack<scalar_t, kWidth>*>(address);
}

template <typename scalar_t, int kWidth>
__device__ __forceinline__ void store_pack(
    scalar_t* address, const ChannelPack<scalar_t, kWidth>& pack) {
  *reinterpret_cast<ChannelPack<scalar_t, kWidth>*>(address) = pack;
}

__device__ __forceinline__ float floor_of(float number) {
  return floorf(number);
}

__device__ __forceinline__ double floor_of(double number) {
  return floor(number);
}

// a * b + c rounded once. Written out wherever a product is summed, because
// nvcc contracts a * b + c into this by default and a host compiler does
// not: explicit, both give the same bits (the CPU emulation's bit-for-bit
// comparison with the GPU relies on it).
__device__ __forceinline__ float fused_multiply_add(float a, float b,
                                                    float c) {
  return fmaf(a, b, c);
}

__device__ __forceinline__ double fused_multiply_add(double a, double b,
                                                     double c) {
  return fma(a, b, c);
}

// The four pixels around one sampling point of one level, in the order
// (top, left), (top, right), (bottom, left), (bottom, right).
template <typename opmath_t>
struct BilinearCorners {
  // Key index of each corner counted from the start of its level; -1 for a
  // corner outside the map, which reads zero (zero padding).
  int64_t keys[4];
  // Bilinear weight of each corner (meaningful only where keys >= 0).
  opmath_t weights[4];
  // Fractional part of the pixel coordinate: the distance from the top-left
  // corner, which the gradients with respect to the location need.
  opmath_t fraction_y;
  opmath_t fraction_x;
  // False when no corner is inside the map; then nothing else is set.
  bool any_inside;
};

// Locates a normalised sampling point on a (height, width) map with the
// conventions of grid_sample(align_corners=False, padding_mode='zeros'):
// pixel coordinate = location * size - 0.5. A point contributes as long as
// one of its corners is inside, that is pixel coordinates in [-1, size).
// At exactly -1 the sampled value is zero but its slope is not, and
// grid_sample (the reference) counts that slope, hence the closed bound.
// The comparisons are false for NaN, so NaN reads as outside, and the
// integer conversion only ever sees coordinates inside [-1, size): a huge or
// infinite location can never produce an out-of-bounds index.
template <typename opmath_t>
__device__ __forceinline__ BilinearCorners<opmath_t> locate_corners(
    opmath_t location_x, opmath_t location_y, int64_t height,
    int64_t width) {
  BilinearCorners<opmath_t> corners;
  const opmath_t pixel_y = fused_multiply_add(
      location_y, static_cast<opmath_t>(height), opmath_t(-0.5));
  const opmath_t pixel_x = fused_multiply_add(
      location_x, static_cast<opmath_t>(width), opmath_t(-0.5));
  corners.any_inside = pixel_y >= opmath_t(-1) && pixel_x >= opmath_t(-1) &&
                       pixel_y < static_cast<opmath_t>(height) &&
                       pixel_x < static_cast<opmath_t>(width);
  if (!corners.any_inside) {
    return corners;
  }
  const opmath_t top_float = floor_of(pixel_y);
  const opmath_t left_float = floor_of(pixel_x);
  const int64_t top = static_cast<int64_t>(top_float);
  const int64_t left = static_cast<int64_t>(left_float);
  const opmath_t fraction_y = pixel_y - top_float;
  const opmath_t fraction_x = pixel_x - left_float;
  corners.fraction_y = fraction_y;
  corners.fraction_x = fraction_x;

  const bool top_inside = top >= 0;
  const bool bottom_inside = top + 1 < height;
  const bool left_inside = left >= 0;
  const bool right_inside = left + 1 < width;
  const int64_t top_row = top * width;
  const int64_t bottom_row = top_row + width;
  corners.keys[0] = top_inside && left_inside ? top_row + left : -1;
  corners.keys[1] = top_inside && right_inside ? top_row + left + 1 : -1;
  corners.keys[2] = bottom_inside && left_inside ? bottom_row + left : -1;
  corners.keys[3] =
      bottom_inside && right_inside ? bottom_row + left + 1 : -1;

  const opmath_t rest_y = opmath_t(1) - fraction_y;
  const opmath_t rest_x = opmath_t(1) - fraction_x;
  corners.weights[0] = rest_y * rest_x;
  corners.weights[1] = rest_y * fraction_x;
  corners.weights[2] = fraction_y * rest_x;
  corners.weights[3] = fraction_y * fraction_x;
  return corners;
}

// Derivatives of the four corner weights with respect to the fractional
// pixel coordinates, in the corner order of BilinearCorners.
template <typename opmath_t>
__device__ __forceinline__ void corner_weight_derivatives(
    const BilinearCorners<opmath_t>& corners, opmath_t (&by_y)[4],
    opmath_t (&by_x)[4]) {
  const opmath_t rest_y = opmath_t(1) - corners.fraction_y;
  const opmath_t rest_x = opmath_t(1) - corners.fraction_x;
  by_y[0] = -rest_x;
  by_y[1] = -corners.fraction_x;
  by_y[2] = rest_x;
  by_y[3] = corners.fraction_x;
  by_x[0] = -rest_y;
  by_x[1] = rest_y;
  by_x[2] = -corners.fraction_y;
  by_x[3] = corners.fraction_y;
}

// Whether a level of height x width keys starting at key `start` lies inside
// the num_keys keys of the value. The op's Python front checks the level
// table on the host; this guards direct calls of torch.ops.ddetr_plugin.*,
// whose table the launcher cannot read without a device-to-host sync. Written
// so that no product can overflow, whatever the table holds.
__device__ __forceinline__ bool level_fits(int64_t height, int64_t width,
                                           int64_t start, int64_t num_keys) {
  if (height < 0 || width < 0 || start < 0 || start > num_keys) {
    return false;
  }
  return height == 0 || width <= (num_keys - start) / height;
}

// Atomic adds into grad_value, which is always opmath_t (float for half and
// bfloat16: the launcher accumulates into a float32 buffer and rounds it to
// the value's dtype once, after the kernel). Float pairs use the vector
// atomic that Hopper (sm_90) provides, two scalar atomics elsewhere.
__device__ __forceinline__ void atomic_add_pair(double* address,
                                                double first, double second) {
  atomicAdd(address, first);
  atomicAdd(address + 1, second);
}

__device__ __forceinline__ void atomic_add_pair(float* address, float first,
                                                float second) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(address), make_float2(first, second));
#else
  atomicAdd(address, first);
  atomicAdd(address + 1, second);
#endif
}

// Adds kWidth consecutive channel contributions into grad_value.
template <typename opmath_t, int kWidth>
__device__ __forceinline__ void atomic_add_channels(
    opmath_t* address, const opmath_t (&addends)[kWidth]) {
  static_assert(kWidth == 1 || kWidth == 2,
                "grad_value atomics support 1 or 2 channels per lane");
  if constexpr (kWidth == 2) {
    atomic_add_pair(address, addends[0], addends[1]);
  } else {
    atomicAdd(address, addends[0]);
  }
}

// Sum over the lanes of one group of group_size consecutive lanes (a power
// of two dividing 32). Every lane of the warp must call it, and every lane
// receives its own group's sum (butterfly reduction).
template <typename opmath_t>
__device__ __forceinline__ opmath_t group_sum(opmath_t number,
                                              int group_size) {
  for (int offset = group_size / 2; offset > 0; offset /= 2) {
    number += __shfl_xor_sync(0xffffffffu, number, offset, group_size);
  }
  return number;
}

}  // namespace cuda
}  // namespace ddetr_plugin
