// Name → kernel dispatch shared by the GPU and host builds. Python passes a kernel's arguments in
// the order of its Triton twin: every tensor as its data pointer (P), every int argument as its int64
// value (I), every compile-time flag as an integer (lrfree/backends/cuda_ext.py builds the lists), plus the
// parameters' and the state's storage dtypes and the block size.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.cuh"

namespace lrfree {

enum DtypeCode : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Converts a pointer argument to whatever pointer type the argument struct's field has.
struct AnyPtr {
  int64_t value;
  template <typename T> operator T*() const { return reinterpret_cast<T*>(static_cast<uintptr_t>(value)); }
};

template <class F> void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kBFloat16: f(bf16{}); break;
    case kFloat16: f(f16{}); break;
    default: throw std::invalid_argument("lrfree extension: unknown dtype code " + std::to_string(dtype));
  }
}

// The storage of a launch: parameters in X, state in S, parameters stored by stochastic rounding under SR.
template <typename X, typename S, bool SR> struct Storage {
  using param = X;
  using state = S;
  static constexpr bool stochastic = SR;
};

// with_storage's template arguments, by name: whether a kernel has state tensors, and whether it stores
// parameters (and so has the SR flag).
constexpr bool kStateless = false, kState = true, kNoSR = false, kSR = true;

// f(Storage<X, S, SR>{}) for the SR flag: stochastic rounding is instantiated only for kernels that store
// parameters (HasSR) and only for bf16 parameters (kernels/rounding.py rounding sets SR for nothing else).
template <bool HasSR, typename X, typename S, class F> void with_rounding(bool sr, F& f) {
  if constexpr (HasSR && std::is_same<X, bf16>::value) {
    if (sr) {
      f(Storage<X, S, true>{});
      return;
    }
  }
  if (sr) throw std::invalid_argument("lrfree extension: stochastic rounding stores bf16 parameters only");
  f(Storage<X, S, false>{});
}

// Calls f(Storage<X, S, SR>{}) for a launch's dtype codes and SR flag. Only the combinations lrfree launches
// are instantiated: state in the accumulation dtype, or in bf16 for parameters that accumulate in fp32
// (lrfree.precision.storage_dtype: fp64 parameters keep fp64 state), and SR as with_rounding says.
template <bool HasState, bool HasSR, class F> void with_storage(int dtype, int state_dtype, bool sr, F&& f) {
  with_dtype(dtype, [&](auto tag) {
    using X = decltype(tag);
    using A = typename Acc<X>::type;
    if (!HasState || state_dtype == (std::is_same<A, double>::value ? kFloat64 : kFloat32)) {
      with_rounding<HasSR, X, A>(sr, f);
      return;
    }
    if constexpr (HasState && std::is_same<A, float>::value) {
      if (state_dtype == kBFloat16) {
        with_rounding<HasSR, X, bf16>(sr, f);
        return;
      }
    }
    throw std::invalid_argument("lrfree extension: no state of dtype code " + std::to_string(state_dtype) +
                                " for parameters of dtype code " + std::to_string(dtype));
  });
}

#define LRF_BODY(NAME, ARGS, CALL)                                           \
  template <typename X, typename S, bool SR> struct NAME {                   \
    ARGS a;                                                                  \
    int64_t block;                                                           \
    int64_t k0, k1, k2, k3;                                                  \
    template <class Ctx> LRF_HD void operator()(Ctx& ctx) const { CALL; }    \
  };

LRF_BODY(SumsqBody, SumsqArgs, (sumsq<X>(ctx, a, block)))
LRF_BODY(SegmentReduceBody, SegmentReduceArgs, (segment_reduce<X>(ctx, a, k0, k1)))
LRF_BODY(SgdApplyBody, SgdApplyArgs, (sgd_apply<X, SR>(ctx, a, block, k0 != 0, k1 != 0)))
LRF_BODY(AdamBody, AdamArgs, (adam<X, S, SR>(ctx, a, block, k0 != 0, k1 != 0)))
LRF_BODY(DAdaptAdamBody, DAdaptAdamArgs, (dadapt_adam<X, S, SR>(ctx, a, block, k0 != 0)))
LRF_BODY(ProdigyStatsBody, ProdigyStatsArgs, (prodigy_stats<X, S>(ctx, a, block, k0 != 0, k1 != 0)))
LRF_BODY(ProdigyApplyBody, ProdigyApplyArgs, (prodigy_apply<X, S, SR>(ctx, a, block, k0 != 0, k1 != 0)))
LRF_BODY(PsdasgdStartBody, PsdasgdStartArgs, (psdasgd_start<X, S>(ctx, a, block, k0 != 0, k1 != 0)))
LRF_BODY(PsdasgdStepBody, PsdasgdStepArgs,
         (psdasgd_step<X, S, SR>(ctx, a, block, k0 != 0, k1 != 0, k2 != 0, k3 != 0)))
LRF_BODY(PsspsStatsBody, PsspsStatsArgs, (pssps_stats<X, S>(ctx, a, block, k0 != 0, k1 != 0)))
LRF_BODY(PsspsApplyBody, PsspsApplyArgs, (pssps_apply<X, S, SR>(ctx, a, block, k0 != 0, k1 != 0, k2 != 0)))

// The kernels this extension provides, by the name of their Triton twin (module.kernel).
inline const std::vector<std::string>& kernel_names() {
  static const std::vector<std::string> names = {
      "common._sumsq_kernel",          "multi_tensor._segment_reduce_kernel", "sgd._sgd_apply_kernel",
      "adam._adam_kernel",             "dadapt_adam._dadapt_adam_kernel",     "prodigy._prodigy_stats_kernel",
      "prodigy._prodigy_apply_kernel", "ps_dasgd._start_kernel",              "ps_dasgd._step_kernel",
      "ps_sps._stats_kernel",          "ps_sps._apply_kernel"};
  return names;
}

// Runs kernel `name` on `grid` programs through `run(grid, body)`, the target's launcher. `dtype` is the
// parameters' storage dtype code, `state_dtype` the state's (ignored by kernels without state tensors).
template <class Run>
void dispatch(const std::string& name, int64_t grid, const std::vector<int64_t>& p, const std::vector<int64_t>& k,
              int dtype, int state_dtype, int64_t block, Run&& run) {
  auto P = [&](size_t i) {
    if (i >= p.size()) throw std::invalid_argument("lrfree extension: too few arguments for " + name);
    return AnyPtr{p[i]};
  };
  // an integer argument (a Python int: the launcher passes it as its int64 value)
  auto I = [&](size_t i) {
    if (i >= p.size()) throw std::invalid_argument("lrfree extension: too few arguments for " + name);
    return p[i];
  };
  auto K = [&](size_t i) { return i < k.size() ? k[i] : int64_t(0); };
  // LRF_RUN(body, kState or kStateless, kSR or kNoSR, the SR flag's value, arguments...)
#define LRF_RUN(BODY, HAS_STATE, HAS_SR, SR, ...)                                                          \
  with_storage<HAS_STATE, HAS_SR>(dtype, state_dtype, (SR) != 0, [&](auto tag) {                          \
    using T = decltype(tag);                                                                               \
    run(grid, BODY<typename T::param, typename T::state, T::stochastic>{{__VA_ARGS__}, block, K(0), K(1), K(2), \
                                                                         K(3)});                          \
  })
  // the SR flag is the last of a kernel's flags (cuda_ext.FLAGS)
  if (name == "common._sumsq_kernel") {
    LRF_RUN(SumsqBody, kStateless, kNoSR, 0, P(0), P(1), P(2), P(3), P(4));
  } else if (name == "multi_tensor._segment_reduce_kernel") {
    // dtype is the partials' (fp32 or fp64); k = (K, MAX_MASK)
    if (dtype == kFloat32) {
      run(grid, SegmentReduceBody<float, float, false>{{P(0), P(1), P(2)}, block, K(0), K(1), 0, 0});
    } else if (dtype == kFloat64) {
      run(grid, SegmentReduceBody<double, double, false>{{P(0), P(1), P(2)}, block, K(0), K(1), 0, 0});
    } else {
      throw std::invalid_argument("lrfree extension: partials must be fp32 or fp64");
    }
  } else if (name == "sgd._sgd_apply_kernel") {
    LRF_RUN(SgdApplyBody, kStateless, kSR, K(2), P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), P(8), P(9), P(10));
  } else if (name == "adam._adam_kernel") {
    LRF_RUN(AdamBody, kState, kSR, K(2), P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), P(8), P(9), P(10));
  } else if (name == "dadapt_adam._dadapt_adam_kernel") {
    LRF_RUN(DAdaptAdamBody, kState, kSR, K(1), P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), P(8), P(9), P(10),
            P(11), P(12), P(13), P(14), P(15), P(16));
  } else if (name == "prodigy._prodigy_stats_kernel") {
    LRF_RUN(ProdigyStatsBody, kState, kNoSR, 0, P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), P(8), P(9), P(10),
            P(11), P(12), P(13), P(14), P(15));
  } else if (name == "prodigy._prodigy_apply_kernel") {
    LRF_RUN(ProdigyApplyBody, kState, kSR, K(2), P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), P(8), P(9), P(10),
            P(11), P(12));
  } else if (name == "ps_dasgd._start_kernel") {
    LRF_RUN(PsdasgdStartBody, kState, kNoSR, 0, P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), P(8), P(9), I(10),
            I(11));
  } else if (name == "ps_dasgd._step_kernel") {
    LRF_RUN(PsdasgdStepBody, kState, kSR, K(4), P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), P(8), P(9), P(10),
            P(11), P(12), P(13), P(14), P(15), P(16));
  } else if (name == "ps_sps._stats_kernel") {
    LRF_RUN(PsspsStatsBody, kState, kNoSR, 0, P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7));
  } else if (name == "ps_sps._apply_kernel") {
    LRF_RUN(PsspsApplyBody, kState, kSR, K(3), P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7), P(8), P(9), P(10),
            P(11), P(12));
  } else {
    throw std::invalid_argument("lrfree extension: no kernel named " + name);
  }
#undef LRF_RUN
}

// Implemented by the target (cuda_launch.cu or host_launch.cpp).
void launch(const std::string& name, int64_t grid, const std::vector<int64_t>& pointers,
            const std::vector<int64_t>& flags, int dtype, int state_dtype, int64_t block, int64_t stream,
            int device);
const char* target();

}  // namespace lrfree
