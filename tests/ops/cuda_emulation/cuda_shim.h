// Stand-ins for the CUDA language features the kernels of
// ddetr_plugin/ops/csrc/cuda use, so that their source compiles with a host
// C++ compiler and runs on the CPU (see emulated_kernels.cpp).
//
// Execution model: the driver runs one warp at a time, its 32 lanes as
// coroutines (ucontext) on one thread. A lane runs until it reaches a
// shuffle or returns from the kernel; once every lane has stopped, the
// shuffle's values are exchanged and the lanes resume in turn. So the
// lanes of a warp run freely between shuffles, as on a GPU, and
// __shfl_xor_sync is a rendezvous of all 32 lanes: a kernel whose lanes do
// not all reach the same shuffles (undefined behaviour with a full mask on a
// GPU) is reported instead of producing numbers. Runs are deterministic;
// the driver can run blocks, warps and lanes in either order, so that
// results depending on the order (conflicting plain writes) show up.
// Atomics need no lock (one thread) and round like the hardware's: the sum
// is formed in float and rounded once to the target type.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__
#define __device__ inline
#define __host__
#define __forceinline__
#define __launch_bounds__(...)

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
using dim3 = uint3;

struct float2 {
  float x, y;
};

inline float2 make_float2(float x, float y) { return float2{x, y}; }

inline uint3 threadIdx;
inline uint3 blockIdx;
inline uint3 blockDim;
inline uint3 gridDim;

namespace cuda_emulation {

constexpr int kLanes = 32;

// One warp: its lanes' coroutines, the scheduler that runs them between
// rendezvous, and the slots through which shuffles exchange values.
class Warp {
 public:
  // Runs kernel() on each lane of warp number warp_index of the current
  // block, resuming the lanes from the last to the first with
  // reverse_lanes. Returns an error message, empty on success.
  std::string run(const std::function<void()>& kernel, int warp_index,
                  bool reverse_lanes) {
    kernel_ = &kernel;
    for (int lane = 0; lane < kLanes; ++lane) {
      stacks_[lane].resize(kStackBytes);
      getcontext(&lanes_[lane]);
      lanes_[lane].uc_stack.ss_sp = stacks_[lane].data();
      lanes_[lane].uc_stack.ss_size = stacks_[lane].size();
      lanes_[lane].uc_link = &scheduler_;
      makecontext(&lanes_[lane], &Warp::lane_entry, 0);
      state_[lane] = State::kReady;
      shuffles_done_[lane] = 0;
    }
    while (true) {
      for (int turn = 0; turn < kLanes; ++turn) {
        const int lane = reverse_lanes ? kLanes - 1 - turn : turn;
        if (state_[lane] != State::kReady) continue;
        threadIdx = uint3{
            static_cast<unsigned int>(warp_index * kLanes + lane), 0, 0};
        running_ = this;
        running_lane_ = lane;
        swapcontext(&scheduler_, &lanes_[lane]);
      }
      int waiting = 0;
      for (int lane = 0; lane < kLanes; ++lane) {
        waiting += state_[lane] == State::kWaiting;
      }
      if (waiting == 0) return "";
      if (waiting != kLanes) {
        return "some lanes of a warp returned from the kernel while others "
               "waited in a shuffle (divergent full-mask shuffle)";
      }
      for (int lane = 0; lane < kLanes; ++lane) state_[lane] = State::kReady;
    }
  }

  // Called by the running lane inside a shuffle: returns once every lane of
  // the warp has reached it.
  void rendezvous() {
    const int lane = running_lane_;
    state_[lane] = State::kWaiting;
    swapcontext(&lanes_[lane], &scheduler_);
  }

  // The set of slots the running lane's next shuffle uses. Alternate
  // shuffles use alternate sets: a lane writes a set again only after the
  // next rendezvous, when every lane has read it.
  unsigned char (&next_slots())[kLanes][16] {
    return slots_[shuffles_done_[running_lane_]++ % 2];
  }

  int running_lane() const { return running_lane_; }

  static Warp* running() { return running_; }

 private:
  enum class State { kReady, kWaiting, kDone };
  static constexpr size_t kStackBytes = 256 * 1024;

  static void lane_entry() {
    Warp* warp = running_;
    (*warp->kernel_)();
    warp->state_[warp->running_lane_] = State::kDone;
    // Returning resumes the scheduler through uc_link.
  }

  static inline Warp* running_ = nullptr;
  const std::function<void()>* kernel_ = nullptr;
  ucontext_t scheduler_;
  ucontext_t lanes_[kLanes];
  std::vector<char> stacks_[kLanes];
  State state_[kLanes];
  int shuffles_done_[kLanes];
  int running_lane_ = 0;
  unsigned char slots_[2][kLanes][16];
};

}  // namespace cuda_emulation

template <typename T>
T __shfl_xor_sync(unsigned int mask, T number, int lane_mask,
                  int width = 32) {
  static_assert(sizeof(T) <= 16, "shuffled type too large");
  if (mask != 0xffffffffu) {
    // Only full-warp shuffles are emulated; the kernels use no other.
    std::abort();
  }
  cuda_emulation::Warp& warp = *cuda_emulation::Warp::running();
  const int lane = warp.running_lane();
  unsigned char(&slots)[32][16] = warp.next_slots();
  std::memcpy(slots[lane], &number, sizeof(T));
  warp.rendezvous();
  int source = lane ^ lane_mask;
  // A lane asking for a later group of width lanes gets its own value.
  if (source / width > lane / width) source = lane;
  T result;
  std::memcpy(&result, slots[source], sizeof(T));
  return result;
}

inline float atomicAdd(float* address, float addend) {
  const float old = *address;
  *address = old + addend;
  return old;
}

inline double atomicAdd(double* address, double addend) {
  const double old = *address;
  *address = old + addend;
  return old;
}

inline float2 atomicAdd(float2* address, float2 addend) {
  const float2 old = *address;
  address->x = old.x + addend.x;
  address->y = old.y + addend.y;
  return old;
}
