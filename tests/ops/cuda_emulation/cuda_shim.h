// Stand-ins for the CUDA language features the kernels of
// ddetr_plugin/ops/csrc/cuda use, so that their source compiles with a host
// C++ compiler and runs on the CPU (see emulated_kernels.cpp).
//
// Execution model: the driver runs one warp at a time, its 32 lanes as
// coroutines on one thread. A lane runs until it reaches a shuffle or
// returns from the kernel; once every lane has stopped, the shuffle's values
// are exchanged and the lanes resume in turn. So the lanes of a warp run
// freely between shuffles, as on a GPU, and __shfl_xor_sync is a rendezvous
// of all 32 lanes: a kernel whose lanes do not all reach the same shuffles
// (undefined behaviour with a full mask on a GPU) is reported instead of
// producing numbers. Runs are deterministic; the driver runs blocks, warps
// and lanes in the order it is given (first to last, last to first, or a
// seeded shuffle), so that results depending on the order (conflicting plain
// writes, atomics) show up. Atomics need no lock (one thread) and round like
// the hardware's: the sum is formed in float and rounded once to the target
// type.
//
// Switching coroutines: on x86-64 a ten-instruction switch that saves the
// callee-saved registers and swaps stacks; elsewhere ucontext, whose
// swapcontext also saves the signal mask with a system call per switch
// (about 50 times slower, too slow for the full-size cases).
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

#if defined(__x86_64__) && defined(__linux__)
#define CUDA_EMULATION_FAST_SWITCH 1
// Saves the callee-saved registers of the System V ABI on the current stack,
// stores the stack pointer in *save, loads `load` as the stack pointer and
// restores the registers saved there. The caller-saved registers are saved
// by the compiler around the call, as for any function call.
extern "C" void cuda_emulation_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl cuda_emulation_switch
  .hidden cuda_emulation_switch
  .type cuda_emulation_switch, @function
cuda_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emulation_switch, .-cuda_emulation_switch
)");
#endif

namespace cuda_emulation {

constexpr int kLanes = 32;

// One warp: its lanes' coroutines, the scheduler that runs them between
// rendezvous, and the slots through which shuffles exchange values.
class Warp {
 public:
  Warp() {
    for (int lane = 0; lane < kLanes; ++lane) {
      stacks_[lane].resize(kStackBytes);
    }
  }

  // Runs kernel() on each lane of warp number warp_index of the current
  // block, resuming the lanes in the order lane_order (a permutation of
  // 0..31). Returns an error message, empty on success.
  std::string run(const std::function<void()>& kernel, int warp_index,
                  const int (&lane_order)[kLanes]) {
    kernel_ = &kernel;
    for (int lane = 0; lane < kLanes; ++lane) {
      prepare_lane(lane);
      state_[lane] = State::kReady;
      shuffles_done_[lane] = 0;
    }
    while (true) {
      for (int turn = 0; turn < kLanes; ++turn) {
        const int lane = lane_order[turn];
        if (state_[lane] != State::kReady) continue;
        threadIdx = uint3{
            static_cast<unsigned int>(warp_index * kLanes + lane), 0, 0};
        running_ = this;
        running_lane_ = lane;
        resume_lane(lane);
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
    state_[running_lane_] = State::kWaiting;
    yield_to_scheduler(running_lane_);
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
  static constexpr size_t kStagger = 17 * 64;

  // Runs the kernel on the running lane, then hands control back for good.
  static void lane_entry() {
    Warp* warp = running_;
    (*warp->kernel_)();
    warp->state_[warp->running_lane_] = State::kDone;
#ifdef CUDA_EMULATION_FAST_SWITCH
    // A fresh stack has no caller to return to: switch away, never resumed.
    warp->yield_to_scheduler(warp->running_lane_);
    std::abort();
#endif
    // With ucontext, returning resumes the scheduler through uc_link.
  }

#ifdef CUDA_EMULATION_FAST_SWITCH
  // A fresh stack whose first switch "returns" into lane_entry with the
  // stack aligned as after a call, and restores six zero registers. The
  // tops are staggered by a few cache lines per lane: stacks a power of two
  // apart would put every lane's hot frames in the same cache sets.
  void prepare_lane(int lane) {
    std::uintptr_t top = reinterpret_cast<std::uintptr_t>(
        stacks_[lane].data() + stacks_[lane].size() - lane * kStagger);
    void** stack = reinterpret_cast<void**>(top & ~std::uintptr_t(15));
    *--stack = nullptr;  // return address of lane_entry, never used
    *--stack = reinterpret_cast<void*>(&Warp::lane_entry);
    for (int saved = 0; saved < 6; ++saved) *--stack = nullptr;
    lane_stacks_[lane] = stack;
  }

  void resume_lane(int lane) {
    cuda_emulation_switch(&scheduler_stack_, lane_stacks_[lane]);
  }

  void yield_to_scheduler(int lane) {
    cuda_emulation_switch(&lane_stacks_[lane], scheduler_stack_);
  }

  void* scheduler_stack_ = nullptr;
  void* lane_stacks_[kLanes];
#else
  void prepare_lane(int lane) {
    getcontext(&lanes_[lane]);
    lanes_[lane].uc_stack.ss_sp = stacks_[lane].data();
    lanes_[lane].uc_stack.ss_size = stacks_[lane].size();
    lanes_[lane].uc_link = &scheduler_;
    makecontext(&lanes_[lane], &Warp::lane_entry, 0);
  }

  void resume_lane(int lane) { swapcontext(&scheduler_, &lanes_[lane]); }

  void yield_to_scheduler(int lane) {
    swapcontext(&lanes_[lane], &scheduler_);
  }

  ucontext_t scheduler_;
  ucontext_t lanes_[kLanes];
#endif

  static inline Warp* running_ = nullptr;
  const std::function<void()>* kernel_ = nullptr;
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
