// Host stand-in for <cuda_fp16.h>: the half types and the conversions and
// atomics the kernels use, on c10::Half (same 16-bit IEEE layout).
#pragma once

#include <c10/util/Half.h>

using __half = c10::Half;

struct alignas(4) __half2 {
  c10::Half x, y;
};

inline __half __float2half_rn(float number) { return c10::Half(number); }

inline __half2 __floats2half2_rn(float first, float second) {
  return __half2{c10::Half(first), c10::Half(second)};
}

inline __half atomicAdd(__half* address, __half addend) {
  const __half old = *address;
  *address = c10::Half(static_cast<float>(old) + static_cast<float>(addend));
  return old;
}

inline __half2 atomicAdd(__half2* address, __half2 addend) {
  const __half2 old = *address;
  address->x = c10::Half(static_cast<float>(old.x) + float(addend.x));
  address->y = c10::Half(static_cast<float>(old.y) + float(addend.y));
  return old;
}
