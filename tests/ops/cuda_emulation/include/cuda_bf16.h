// Host stand-in for <cuda_bf16.h>: the bfloat16 types and the conversions
// and atomics the kernels use, on c10::BFloat16 (same 16-bit layout).
#pragma once

#include <c10/util/BFloat16.h>

using __nv_bfloat16 = c10::BFloat16;

struct alignas(4) __nv_bfloat162 {
  c10::BFloat16 x, y;
};

inline __nv_bfloat16 __float2bfloat16_rn(float number) {
  return c10::BFloat16(number);
}

inline __nv_bfloat162 __floats2bfloat162_rn(float first, float second) {
  return __nv_bfloat162{c10::BFloat16(first), c10::BFloat16(second)};
}

inline __nv_bfloat16 atomicAdd(__nv_bfloat16* address,
                               __nv_bfloat16 addend) {
  const __nv_bfloat16 old = *address;
  *address =
      c10::BFloat16(static_cast<float>(old) + static_cast<float>(addend));
  return old;
}

inline __nv_bfloat162 atomicAdd(__nv_bfloat162* address,
                                __nv_bfloat162 addend) {
  const __nv_bfloat162 old = *address;
  address->x = c10::BFloat16(static_cast<float>(old.x) + float(addend.x));
  address->y = c10::BFloat16(static_cast<float>(old.y) + float(addend.y));
  return old;
}
