// Host target: the GPU launch emulated on the CPU, so that machines without a GPU can test the
// kernels against the torch reference. Each program runs its kThreads threads one after another
// (thread 0 last), each thread striding through the program's elements exactly as on the GPU, and a
// block reduction combines the threads' values in the same fixed tree as cuda_launch.cu (shuffle-down
// within each warp of 32, then across warps). Only thread 0 uses a reduction's result, and it runs
// after every other thread has contributed, so no real concurrency is needed.
#include <array>

#include "dispatch.h"

namespace lrfree {

namespace {

using Slots = std::vector<std::array<double, kThreads>>;

template <typename T, bool IsMax> T combine(T a, T b) { return IsMax ? (a > b ? a : b) : a + b; }

// One warp's __shfl_down_sync tree: lane l adds lane l + offset (its own value past the warp's end).
template <typename T, bool IsMax> T warp_tree(std::array<T, 32> lane) {
  for (int offset = 16; offset > 0; offset /= 2) {
    std::array<T, 32> next;
    for (int l = 0; l < 32; ++l) next[l] = combine<T, IsMax>(lane[l], l + offset < 32 ? lane[l + offset] : lane[l]);
    lane = next;
  }
  return lane[0];
}

struct HostCtx {
  int64_t pid;
  int64_t tid;
  int64_t nthreads;
  Slots* slots;
  int calls = 0;

  template <typename T, bool IsMax> T reduce(T v) {
    size_t k = size_t(calls++);
    if (slots->size() <= k) slots->resize(k + 1);
    (*slots)[k][size_t(tid)] = double(v);
    if (tid != 0) return v;  // only thread 0's result is used
    constexpr int kWarps = kThreads / 32;
    std::array<T, 32> per_warp;
    for (int w = 0; w < 32; ++w) per_warp[w] = IsMax ? T(-INFINITY) : T(0);
    for (int w = 0; w < kWarps; ++w) {
      std::array<T, 32> lane;
      for (int l = 0; l < 32; ++l) lane[l] = T((*slots)[k][size_t(32 * w + l)]);
      per_warp[w] = T(double(warp_tree<T, IsMax>(lane)));
    }
    return warp_tree<T, IsMax>(per_warp);
  }
  template <typename T> T sum(T v) { return reduce<T, false>(v); }
  template <typename T> T max(T v) { return reduce<T, true>(v); }
  bool leader() const { return tid == 0; }
};

}  // namespace

void launch(const std::string& name, int64_t grid, const std::vector<int64_t>& pointers,
            const std::vector<int64_t>& flags, int dtype, int state_dtype, int64_t block, int64_t /*stream*/,
            int /*device*/) {
  Slots slots;
  dispatch(name, grid, pointers, flags, dtype, state_dtype, block, [&](int64_t n, const auto& body) {
    for (int64_t pid = 0; pid < n; ++pid) {
      for (int64_t tid = kThreads - 1; tid >= 0; --tid) {
        HostCtx ctx{pid, tid, kThreads, &slots};
        body(ctx);
      }
    }
  });
}

const char* target() { return "host"; }

}  // namespace lrfree
