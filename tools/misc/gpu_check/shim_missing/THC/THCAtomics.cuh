// Stand-in for THC/THCAtomics.cuh, which torch removed after 2.11: mmcv
// 2.1.0's kernel includes it for the atomicAdd overloads that ATen now
// declares in ATen/cuda/Atomic.cuh. Searched after torch's own include
// directories, so a torch that still ships the header uses its own.
#pragma once

#include <ATen/cuda/Atomic.cuh>
