// lrfree's fused passes as CUDA C++, written once for two targets:
//
//  * the GPU (cuda_launch.cu): a CUDA block of 256 threads runs one "program" of the launch
//    geometry (BLOCK elements of one tensor, found through the block map), threads stride through
//    those elements, and block sums are a fixed shuffle/shared-memory tree;
//  * the host (host_launch.cpp): every program runs serially on the CPU. Tests build this variant
//    on machines without a GPU and compare it with the torch reference, so the per-element math and
//    the table/offset handling below are checked in CI, not only on a GPU.
//
// Each kernel mirrors the Triton kernel of the same name in kernels/<module>.py argument for
// argument: int64 tables of data pointers per slot, int64 element counts, int32 block → tensor map,
// int64 first element of every block (64-bit offsets), fp64 coefficient vectors, int32 flags, and
// per-program partials (the accumulation dtype) that multi_tensor.per_tensor reduces per tensor in a
// fixed order in fp64 — no atomics anywhere, so a step run twice is bit-identical. Kernels are templates
// over the parameters' storage type X, the state's S (X's accumulation type, or bf16) and SR (bf16
// parameters stored by stochastic rounding), the Triton kernels' X, S and SR constants.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LRF_HD __host__ __device__ __forceinline__
#define LRF_DEVICE __device__ __forceinline__
#else
#define LRF_HD inline
#define LRF_DEVICE inline
#endif

namespace lrfree {

// Threads per program on the GPU (and in the host emulation, which reduces in the same order).
constexpr int kThreads = 256;

// ------------------------------------------------------------------------------------------ storage

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

template <typename X> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

LRF_HD float to_float(float v) { return v; }
LRF_HD double to_float(double v) { return v; }

#ifdef __CUDACC__
LRF_HD float to_float(bf16 v) { return __bfloat162float(__ushort_as_bfloat16(v.bits)); }
LRF_HD float to_float(f16 v) { return __half2float(__ushort_as_half(v.bits)); }
LRF_HD bf16 to_bf16(float v) { return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(v))}; }
LRF_HD f16 to_f16(float v) { return f16{__half_as_ushort(__float2half_rn(v))}; }
#else
inline float to_float(bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bf16 to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}
inline float to_float(f16 v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return float(h);
}
inline f16 to_f16(float f) {
  _Float16 h = _Float16(f);
  f16 out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}
#endif

template <typename X> struct Store;
template <> struct Store<float> { LRF_HD static float from(float v) { return v; } };
template <> struct Store<double> { LRF_HD static double from(double v) { return v; } };
template <> struct Store<bf16> { LRF_HD static bf16 from(float v) { return to_bf16(v); } };
template <> struct Store<f16> { LRF_HD static f16 from(float v) { return to_f16(v); } };

template <typename X, typename A> LRF_HD A load(const X* p, int64_t i) { return A(to_float(p[i])); }
template <typename X, typename A> LRF_HD void store(X* p, int64_t i, A v) { p[i] = Store<X>::from(v); }

// ------------------------------------------------------------------------------- stochastic rounding
// kernels/rounding.py bit for bit, so that every backend stores the same bf16 parameters and state. The
// dither of element i of a tensor is mix32(uint32(i) ^ seed) & 0xFFFF, with the tensor's step seed
// (sr_seeds[t], int64 values below 2^32) for a parameter and mix32(seed ^ salt) for a state key. All
// arithmetic is on uint32_t, which wraps mod 2^32 as Triton's uint32 does.

LRF_HD uint32_t mix32(uint32_t x) {  // kernels/rounding.py mix32: two multiply-xorshift rounds
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  return x ^ (x >> 16);
}

LRF_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);  // a device intrinsic: the host pass of nvcc takes the memcpy below
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// `value` stochastically rounded to bf16 (kernels/rounding.py _stochastic_bf16): its fp32 bits plus 16
// dither bits, truncated, so the magnitude rounds up with probability remainder / ulp. The truncated value
// is a bf16 value, so its top half is the bf16 Triton's conversion stores. NaN is rounded to nearest, as
// there (a dither could carry its payload into the sign bit).
LRF_HD bf16 stochastic_bf16(float value, uint32_t seed, int64_t index) {
  if (value != value) return to_bf16(value);
  uint32_t dither = mix32(uint32_t(index) ^ seed) & 0xFFFFu;
  return bf16{uint16_t((float_bits(value) + dither) >> 16)};
}

// The state keys' salts, lrfree.precision.salt(key) = zlib.crc32(key) & 0x7FFFFFFF. Constants here as in the
// Triton kernels (kernels/rounding.py SALT_*, compile-time constants of each store), so that a launch passes
// the Triton twin's arguments and nothing more; tests/test_cuda_ext.py checks them against
// lrfree.precision.salt through the bindings' salts().
constexpr uint32_t kSaltExpAvg = 0x2A894737u;      // "exp_avg"
constexpr uint32_t kSaltExpAvgSq = 0x31C9CA79u;    // "exp_avg_sq"
constexpr uint32_t kSaltMaxExpAvgSq = 0x22BAF989u; // "max_exp_avg_sq"
constexpr uint32_t kSaltS = 0x1B0ECF0Bu;           // "s"

template <typename S> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<bf16> { static constexpr bool value = true; };

// Tensor t's dither seeds for a launch whose state is stored in S and whose parameters are stochastically
// rounded under SR. sr_seeds is read only when something is rounded stochastically: otherwise the launch
// passes a placeholder, as the Triton kernels' callers do (kernels/rounding.py rounding).
template <typename S, bool SR> struct Seeds {
  uint32_t param = 0;
  LRF_HD Seeds(const int64_t* sr_seeds, int64_t t) {
    if (SR || IsBf16<S>::value) param = uint32_t(sr_seeds[t]);
  }
  // the seed of a state key (to_state): the parameter's seed salted by the key
  LRF_HD uint32_t state(uint32_t salt) const { return IsBf16<S>::value ? mix32(param ^ salt) : 0u; }
};

// to_state of kernels/rounding.py: bf16 state by stochastic rounding with its key's seed, state in the
// accumulation type as it is. Element i of the state tensor is dithered by index i.
template <typename S> struct StateStore {
  template <typename A> LRF_HD static S from(A v, uint32_t, int64_t) { return Store<S>::from(v); }
};
template <> struct StateStore<bf16> {
  LRF_HD static bf16 from(float v, uint32_t seed, int64_t i) { return stochastic_bf16(v, seed, i); }
};
template <typename S, typename A> LRF_HD void store_state(S* p, int64_t i, A v, uint32_t seed) {
  p[i] = StateStore<S>::from(v, seed, i);
}

// to_param of kernels/rounding.py: a new parameter value, stochastically rounded under SR (bf16 parameters
// only, which accumulate in fp32), else rounded to nearest.
template <typename X, bool SR> struct ParamStore {
  static_assert(!SR, "stochastic rounding stores bf16 parameters only");
  template <typename A> LRF_HD static X from(A v, uint32_t, int64_t) { return Store<X>::from(v); }
};
template <> struct ParamStore<bf16, true> {
  LRF_HD static bf16 from(float v, uint32_t seed, int64_t i) { return stochastic_bf16(v, seed, i); }
};
template <typename X, bool SR, typename A> LRF_HD void store_param(X* p, int64_t i, A v, uint32_t seed) {
  p[i] = ParamStore<X, SR>::from(v, seed, i);
}

template <typename T> LRF_HD T* slot_ptr(const int64_t* table, int64_t t) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(table[t]));
}

// ------------------------------------------------------------------------------- one program's view

// The elements of program `pid`: tensor `t`, flat indices [begin, end). A Ctx provides the thread's
// first index and stride within them and block-wide reductions (see the two launch files).
struct Span {
  int64_t t, begin, end;
};

// The elements of block `b` of the geometry (a persistent program loops over several blocks).
LRF_HD Span block_span(int64_t b, const int64_t* numels, const int32_t* block_tensor, const int64_t* block_start,
                       int64_t block) {
  Span s;
  s.t = block_tensor[b];
  s.begin = block_start[b];
  int64_t n = numels[s.t];
  s.end = s.begin + block < n ? s.begin + block : n;
  return s;
}

template <class Ctx>
LRF_HD Span span_of(const Ctx& ctx, const int64_t* numels, const int32_t* block_tensor, const int64_t* block_start,
                    int64_t block) {
  return block_span(ctx.pid, numels, block_tensor, block_start, block);
}

// Column `col` of this program's row of a (programs, k) partials buffer; `value` must come from a
// block reduction every thread took part in, so only the leader stores.
template <typename A, class Ctx>
LRF_HD void store_partial(const Ctx& ctx, void* partials, int64_t k, int64_t col, A value) {
  if (ctx.leader()) static_cast<A*>(partials)[k * ctx.pid + col] = value;
}

#define LRF_FOR(ctx, s, i) for (int64_t i = (s).begin + (ctx).tid; i < (s).end; i += (ctx).nthreads)

// α² = √v̂ + ε of the Adam scaling rule (kernels/scaling.py adam_scale); c = the fp64 coefficient
// vector [β1, 1−β1, 1−β1^t, β2, 1−β2, 1−β2^t, max(1−β2^(t−1), 1 if t = 1), ε].
template <typename A> struct Scale {
  A v_new, vmax_new, alpha_sq, alpha_sq_prev;
};

template <typename A>
LRF_HD Scale<A> adam_scale(A g, A v, A vmax, const double* c, bool amsgrad) {
  Scale<A> r;
  r.v_new = A(c[3]) * v + A(c[4]) * g * g;
  A eps = A(c[7]);
  if (amsgrad) {
    A vhat = r.v_new / A(c[5]);
    r.vmax_new = vmax > vhat ? vmax : vhat;
    r.alpha_sq = sqrt(r.vmax_new) + eps;
    r.alpha_sq_prev = sqrt(vmax) + eps;
  } else {
    r.vmax_new = vmax;
    r.alpha_sq = sqrt(r.v_new) / sqrt(A(c[5])) + eps;
    r.alpha_sq_prev = sqrt(v) / sqrt(A(c[6])) + eps;
  }
  return r;
}

// ------------------------------------------------------------------------------------------ kernels
// Argument structs hold the Triton kernel's arguments in its order.

struct SumsqArgs { const int64_t* g; const int64_t* numels; const int32_t* bt; const int64_t* bs; void* partials; };

template <typename X, class Ctx> LRF_HD void sumsq(Ctx& ctx, const SumsqArgs& a, int64_t block) {
  using A = typename Acc<X>::type;
  Span s = span_of(ctx, a.numels, a.bt, a.bs, block);
  const X* g = slot_ptr<const X>(a.g, s.t);
  A acc = 0;
  LRF_FOR(ctx, s, i) { A gi = load<X, A>(g, i); acc += gi * gi; }
  store_partial(ctx, a.partials, 1, 0, ctx.sum(acc));
}

struct SegmentReduceArgs { const void* partials; const int32_t* block_first; double* out; };

// One program per tensor: fp64 sums (or maxima for the columns in max_mask) of its blocks' partials,
// in block order.
template <typename P, class Ctx>
LRF_HD void segment_reduce(Ctx& ctx, const SegmentReduceArgs& a, int64_t k_cols, int64_t max_mask) {
  const P* partials = static_cast<const P*>(a.partials);
  int64_t lo = a.block_first[ctx.pid], hi = a.block_first[ctx.pid + 1];
  for (int64_t k = 0; k < k_cols; ++k) {
    bool is_max = (max_mask >> k) & 1;
    double acc = is_max ? -INFINITY : 0.0;
    for (int64_t b = lo + ctx.tid; b < hi; b += ctx.nthreads) {
      double v = double(partials[b * k_cols + k]);
      acc = is_max ? (v > acc ? v : acc) : acc + v;
    }
    acc = is_max ? ctx.max(acc) : ctx.sum(acc);
    if (ctx.leader()) a.out[ctx.pid * k_cols + k] = acc;
  }
}

struct SgdApplyArgs {
  const int64_t* x; const int64_t* g; const int64_t* best; const int64_t* numels; const int32_t* bt;
  const int64_t* bs; const double* coef; const double* decay; const int32_t* ok; const int32_t* copy_best;
  const int64_t* sr_seeds;
};

template <typename X, bool SR, class Ctx>
LRF_HD void sgd_apply(Ctx& ctx, const SgdApplyArgs& a, int64_t block, bool has_decay, bool track_best) {
  using A = typename Acc<X>::type;
  if (*a.ok == 0) return;
  Span s = span_of(ctx, a.numels, a.bt, a.bs, block);
  X* x = slot_ptr<X>(a.x, s.t);
  const X* g = slot_ptr<const X>(a.g, s.t);
  X* best = slot_ptr<X>(a.best, s.t);
  A coef = A(a.coef[s.t]), decay = has_decay ? A(a.decay[s.t]) : A(0);
  bool copy = track_best && *a.copy_best != 0;
  Seeds<A, SR> seeds(a.sr_seeds, s.t);
  LRF_FOR(ctx, s, i) {
    A xi = load<X, A>(x, i), gi = load<X, A>(g, i);
    if (has_decay) gi = gi + decay * xi;
    if (copy) store<X, A>(best, i, xi);
    store_param<X, SR, A>(x, i, xi - coef * gi, seeds.param);
  }
}

struct AdamArgs {
  const int64_t* x; const int64_t* g; const int64_t* m; const int64_t* v; const int64_t* vmax;
  const int64_t* numels; const int32_t* bt; const int64_t* bs; const double* table; const int32_t* ok;
  const int64_t* sr_seeds;
};

template <typename X, typename S, bool SR, class Ctx>
LRF_HD void adam(Ctx& ctx, const AdamArgs& a, int64_t block, bool decoupled, bool amsgrad) {
  using A = typename Acc<X>::type;
  if (*a.ok == 0) return;
  Span s = span_of(ctx, a.numels, a.bt, a.bs, block);
  // per tensor: (β1, 1−β1, β2, 1−β2, eps, wd, 1 − lr·wd, step size lr/bc1, √bc2, sign)
  const double* row = a.table + 10 * s.t;
  X* x = slot_ptr<X>(a.x, s.t);
  const X* g = slot_ptr<const X>(a.g, s.t);
  S* m = slot_ptr<S>(a.m, s.t);
  S* v = slot_ptr<S>(a.v, s.t);
  S* vmax = slot_ptr<S>(a.vmax, s.t);
  A b1 = A(row[0]), c1 = A(row[1]), b2 = A(row[2]), c2 = A(row[3]), eps = A(row[4]), wd = A(row[5]);
  A shrink = A(row[6]), lr = A(row[7]), sqrt_bc2 = A(row[8]), sign = A(row[9]);
  Seeds<S, SR> seeds(a.sr_seeds, s.t);
  const uint32_t m_seed = seeds.state(kSaltExpAvg), v_seed = seeds.state(kSaltExpAvgSq);
  const uint32_t vmax_seed = seeds.state(kSaltMaxExpAvgSq);
  LRF_FOR(ctx, s, i) {
    A xi = load<X, A>(x, i), gi = load<X, A>(g, i) * sign;
    if (decoupled) xi = xi * shrink; else gi = gi + wd * xi;
    A mi = b1 * load<S, A>(m, i) + c1 * gi;
    A vi = b2 * load<S, A>(v, i) + c2 * gi * gi;
    store_state(m, i, mi, m_seed);
    store_state(v, i, vi, v_seed);
    if (amsgrad) {
      A vmax_i = load<S, A>(vmax, i);
      vi = vmax_i > vi ? vmax_i : vi;
      store_state(vmax, i, vi, vmax_seed);
    }
    A denom = sqrt(vi) / sqrt_bc2 + eps;  // from the moments as computed, not as stored (as in Triton)
    store_param<X, SR, A>(x, i, xi - lr * (mi / denom), seeds.param);
  }
}

struct DAdaptAdamArgs {
  const int64_t* x; const int64_t* g; const int64_t* s; const int64_t* m; const int64_t* v;
  const int64_t* numels; const int32_t* bt; const int64_t* bs; const double* eps; const double* decay;
  const double* scale; const double* adapting; const double* dlr; const int32_t* ok; void* partials;
  const double* coeffs; const int64_t* sr_seeds;
};

template <typename X, typename S, bool SR, class Ctx>
LRF_HD void dadapt_adam(Ctx& ctx, const DAdaptAdamArgs& a, int64_t block, bool decouple) {
  using A = typename Acc<X>::type;
  Span sp = span_of(ctx, a.numels, a.bt, a.bs, block);
  int64_t t = sp.t;
  bool accept = *a.ok != 0;
  A b1 = A(a.coeffs[0]), c1 = A(a.coeffs[1]), b2 = A(a.coeffs[2]), c2 = A(a.coeffs[3]);
  A sqrt_b2 = A(a.coeffs[4]), c_sqrt_b2 = A(a.coeffs[5]);
  A eps = A(a.eps[t]), decay = A(a.decay[t]), dlr = A(*a.dlr), scale = A(a.scale[t]);
  bool adapting = a.adapting[t] != 0;
  X* x = slot_ptr<X>(a.x, t);
  const X* g = slot_ptr<const X>(a.g, t);
  S* s = slot_ptr<S>(a.s, t);
  S* m = slot_ptr<S>(a.m, t);
  S* v = slot_ptr<S>(a.v, t);
  Seeds<S, SR> seeds(a.sr_seeds, t);
  const uint32_t s_seed = seeds.state(kSaltS), m_seed = seeds.state(kSaltExpAvg), v_seed = seeds.state(kSaltExpAvgSq);
  A num = 0, l1 = 0;
  LRF_FOR(ctx, sp, i) {
    A xi = load<X, A>(x, i), mi = load<S, A>(m, i), vi = load<S, A>(v, i);
    if (adapting) {
      A gi = load<X, A>(g, i);
      if (!decouple) gi = gi + decay * xi;
      A si = load<S, A>(s, i);
      num += gi * (si / (sqrt(vi) + eps));
      mi = b1 * mi + (scale * dlr * c1) * gi;
      vi = b2 * vi + c2 * gi * gi;
      si = sqrt_b2 * si + (dlr * c_sqrt_b2) * gi;
      l1 += fabs(si);
      if (accept) {
        store_state(m, i, mi, m_seed);
        store_state(v, i, vi, v_seed);
        store_state(s, i, si, s_seed);
      }
      if (decouple) xi = xi - decay * dlr * xi;  // decay = c·wd: part of the group's step
      if (accept) store_param<X, SR, A>(x, i, xi - mi / (sqrt(vi) + eps), seeds.param);
    }  // lr = 0: the group's step is 0, x is left as it is
  }
  store_partial(ctx, a.partials, 2, 0, ctx.sum(num));
  store_partial(ctx, a.partials, 2, 1, ctx.sum(l1));
}

struct ProdigyStatsArgs {
  const int64_t* x; const int64_t* g; const int64_t* p0; const int64_t* s; const int64_t* m; const int64_t* v;
  const int64_t* numels; const int32_t* bt; const int64_t* bs; const int64_t* slices; const double* decay;
  const double* s_coef; const double* coeffs; const int32_t* ok; void* partials; const int64_t* sr_seeds;
};

template <typename X, typename S, class Ctx>
LRF_HD void prodigy_stats(Ctx& ctx, const ProdigyStatsArgs& a, int64_t block, bool coupled, bool has_m) {
  using A = typename Acc<X>::type;
  Span sp = span_of(ctx, a.numels, a.bt, a.bs, block);
  int64_t t = sp.t, stride = a.slices[t];
  bool accept = *a.ok != 0;
  // (β1, d(1−β1), β2, d²(1−β2), β3), formed on the device in fp64
  A b1 = A(a.coeffs[0]), c1 = A(a.coeffs[1]), b2 = A(a.coeffs[2]), c2 = A(a.coeffs[3]), b3 = A(a.coeffs[4]);
  A decay = A(a.decay[t]), s_coef = A(a.s_coef[t]);
  const X* x = slot_ptr<const X>(a.x, t);
  const X* g = slot_ptr<const X>(a.g, t);
  const X* p0 = slot_ptr<const X>(a.p0, t);
  S* s = slot_ptr<S>(a.s, t);
  S* m = slot_ptr<S>(a.m, t);
  S* v = slot_ptr<S>(a.v, t);
  // the stats pass stores state only: its parameters are stored by the apply pass
  Seeds<S, false> seeds(a.sr_seeds, t);
  const uint32_t s_seed = seeds.state(kSaltS), m_seed = seeds.state(kSaltExpAvg), v_seed = seeds.state(kSaltExpAvgSq);
  A num = 0, l1 = 0;
  LRF_FOR(ctx, sp, i) {
    A xi = load<X, A>(x, i), gi = load<X, A>(g, i);
    if (coupled) gi = gi + decay * xi;
    if (has_m) {
      A mi = b1 * load<S, A>(m, i) + c1 * gi;
      if (accept) store_state(m, i, mi, m_seed);
    }
    A vi = b2 * load<S, A>(v, i) + c2 * gi * gi;
    if (accept) store_state(v, i, vi, v_seed);
    if (i % stride == 0) {
      int64_t j = i / stride;  // s keeps every stride-th element: j indexes s, and its dither
      A sj = b3 * load<S, A>(s, j) + s_coef * gi;
      if (accept) store_state(s, j, sj, s_seed);
      num += gi * (load<X, A>(p0, j) - xi);
      l1 += fabs(sj);
    }
  }
  store_partial(ctx, a.partials, 2, 0, ctx.sum(num));
  store_partial(ctx, a.partials, 2, 1, ctx.sum(l1));
}

struct ProdigyApplyArgs {
  const int64_t* x; const int64_t* g; const int64_t* m; const int64_t* v; const int64_t* numels;
  const int32_t* bt; const int64_t* bs; const double* decay; const double* eps; const double* dlr;
  const double* d_new; const int32_t* proceed; const int64_t* sr_seeds;
};

template <typename X, typename S, bool SR, class Ctx>
LRF_HD void prodigy_apply(Ctx& ctx, const ProdigyApplyArgs& a, int64_t block, bool coupled, bool has_m) {
  using A = typename Acc<X>::type;
  if (*a.proceed == 0) return;
  Span sp = span_of(ctx, a.numels, a.bt, a.bs, block);
  int64_t t = sp.t;
  // dlr: the tensor's step c·λ (its group's lr ratio times the shared step)
  A dlr = A(a.dlr[t]), d_new = A(*a.d_new), decay = A(a.decay[t]), eps = A(a.eps[t]);
  X* x = slot_ptr<X>(a.x, t);
  const X* g = slot_ptr<const X>(a.g, t);
  const S* m = slot_ptr<const S>(a.m, t);
  const S* v = slot_ptr<const S>(a.v, t);
  Seeds<S, SR> seeds(a.sr_seeds, t);
  LRF_FOR(ctx, sp, i) {
    A xi = load<X, A>(x, i);
    A denom = sqrt(load<S, A>(v, i)) + d_new * eps;
    A step;
    if (has_m) {
      step = dlr * load<S, A>(m, i) / denom;
    } else {
      A gi = load<X, A>(g, i);
      if (coupled) gi = gi + decay * xi;
      step = dlr * d_new * gi / denom;
    }
    if (!coupled) xi = xi - decay * dlr * xi;
    store_param<X, SR, A>(x, i, xi - step, seeds.param);
  }
}

struct PsdasgdStartArgs {
  const int64_t* g; const int64_t* v; const int64_t* vmax; const int64_t* numels; const int32_t* bt;
  const int64_t* bs; const double* c; const double* weights; const int32_t* started; double* partials;
  int64_t n_blocks; int64_t programs;
};

// Persistent (kernels/common.py until_known): program pid sums blocks pid, pid + programs, ... while n0 is
// not known, each block's sums in A as a full-grid program forms them, the program's totals in fp64; its
// row is zeros once `started` is set.
template <typename X, typename S, class Ctx>
LRF_HD void psdasgd_start(Ctx& ctx, const PsdasgdStartArgs& a, int64_t block, bool scaled, bool amsgrad) {
  using A = typename Acc<X>::type;
  double ratio_total = 0, alpha_total = 0;
  const int64_t end = *a.started != 0 ? 0 : a.n_blocks;
  for (int64_t b = ctx.pid; b < end; b += a.programs) {
    Span sp = block_span(b, a.numels, a.bt, a.bs, block);
    const X* g = slot_ptr<const X>(a.g, sp.t);
    const S* v = slot_ptr<const S>(a.v, sp.t);
    const S* vmax = slot_ptr<const S>(a.vmax, sp.t);
    A ratio = 0, alpha_sum = 0;
    LRF_FOR(ctx, sp, i) {
      A gi = load<X, A>(g, i);
      A alpha_sq = A(1);
      if (scaled) {
        A vi = load<S, A>(v, i);
        alpha_sq = adam_scale<A>(gi, vi, amsgrad ? load<S, A>(vmax, i) : vi, a.c, amsgrad).alpha_sq;
      }
      ratio += gi * gi / alpha_sq;
      alpha_sum += alpha_sq;
    }
    // the block's sums times its tensor's lr ratio (fp64; 1 for every tensor when the group lrs are equal)
    ratio_total += double(ctx.sum(ratio)) * a.weights[sp.t];  // meaningful in the leader, which stores the row
    alpha_total += double(ctx.sum(alpha_sum)) * a.weights[sp.t];
  }
  store_partial(ctx, a.partials, 2, 0, ratio_total);
  store_partial(ctx, a.partials, 2, 1, alpha_total);
}

struct PsdasgdStepArgs {
  const int64_t* x; const int64_t* g; const int64_t* s; const int64_t* m; const int64_t* v; const int64_t* vmax;
  const int64_t* x0; const int64_t* numels; const int32_t* bt; const int64_t* bs; const double* c;
  const double* decay; const double* dlr; const double* averaging; const int32_t* ok; void* partials;
  const int64_t* sr_seeds;
};

template <typename X, typename S, bool SR, class Ctx>
LRF_HD void psdasgd_step(Ctx& ctx, const PsdasgdStepArgs& a, int64_t block, bool scaled, bool amsgrad, bool has_m,
                         bool averaging) {
  using A = typename Acc<X>::type;
  Span sp = span_of(ctx, a.numels, a.bt, a.bs, block);
  int64_t t = sp.t;
  bool accept = *a.ok != 0;
  X* x = slot_ptr<X>(a.x, t);
  const X* g = slot_ptr<const X>(a.g, t);
  S* s = slot_ptr<S>(a.s, t);
  S* m = slot_ptr<S>(a.m, t);
  S* v = slot_ptr<S>(a.v, t);
  S* vmax = slot_ptr<S>(a.vmax, t);
  const X* x0 = slot_ptr<const X>(a.x0, t);
  Seeds<S, SR> seeds(a.sr_seeds, t);
  const uint32_t s_seed = seeds.state(kSaltS), m_seed = seeds.state(kSaltExpAvg), v_seed = seeds.state(kSaltExpAvgSq);
  const uint32_t vmax_seed = seeds.state(kSaltMaxExpAvgSq);
  // dlr: the tensor's step c·λ (its group's lr ratio times the shared step)
  A decay = A(a.decay[t]), dlr = A(a.dlr[t]), c1 = A(a.c[1]), bc1 = A(a.c[2]);
  // the tensor's group's primal averaging (μ, 1 − μ), per tensor
  A mu = A(a.averaging[2 * t]), one_minus_mu = A(a.averaging[2 * t + 1]);
  A dot = 0, snorm = 0, ratio_max = 0;
  LRF_FOR(ctx, sp, i) {
    A xi = load<X, A>(x, i), gi = load<X, A>(g, i), si = load<S, A>(s, i);
    A alpha_sq = A(1), alpha_sq_prev = A(1);
    if (scaled) {
      A vi = load<S, A>(v, i);
      Scale<A> sc = adam_scale<A>(gi, vi, amsgrad ? load<S, A>(vmax, i) : vi, a.c, amsgrad);
      alpha_sq = sc.alpha_sq;
      alpha_sq_prev = sc.alpha_sq_prev;
      if (accept) {
        store_state(v, i, sc.v_new, v_seed);
        if (amsgrad) store_state(vmax, i, sc.vmax_new, vmax_seed);
      }
    }
    A u;
    if (has_m) {
      A m_old = load<S, A>(m, i);
      A mi = m_old + c1 * (gi - m_old);
      if (accept) store_state(m, i, mi, m_seed);
      u = (mi / bc1) / alpha_sq;
    } else {
      u = gi / alpha_sq;
    }
    u = u + decay * xi;
    dot += gi * si;
    si = si + dlr * u;
    if (accept) store_state(s, i, si, s_seed);
    snorm += alpha_sq * si * si;
    A r = alpha_sq_prev / alpha_sq;
    ratio_max = r > ratio_max ? r : ratio_max;
    if (averaging) xi = xi * mu + (load<X, A>(x0, i) - si) * one_minus_mu;
    else xi = xi - dlr * u;
    if (accept) store_param<X, SR, A>(x, i, xi, seeds.param);
  }
  store_partial(ctx, a.partials, 3, 0, ctx.sum(dot));
  store_partial(ctx, a.partials, 3, 1, ctx.sum(snorm));
  store_partial(ctx, a.partials, 3, 2, ctx.max(ratio_max));
}

struct PsspsStatsArgs {
  const int64_t* g; const int64_t* v; const int64_t* vmax; const int64_t* numels; const int32_t* bt;
  const int64_t* bs; const double* c; void* partials;
};

template <typename X, typename S, class Ctx>
LRF_HD void pssps_stats(Ctx& ctx, const PsspsStatsArgs& a, int64_t block, bool scaled, bool amsgrad) {
  using A = typename Acc<X>::type;
  Span sp = span_of(ctx, a.numels, a.bt, a.bs, block);
  const X* g = slot_ptr<const X>(a.g, sp.t);
  const S* v = slot_ptr<const S>(a.v, sp.t);
  const S* vmax = slot_ptr<const S>(a.vmax, sp.t);
  A acc = 0;
  LRF_FOR(ctx, sp, i) {
    A gi = load<X, A>(g, i);
    A alpha_sq = A(1);
    if (scaled) {
      A vi = load<S, A>(v, i);
      alpha_sq = adam_scale<A>(gi, vi, amsgrad ? load<S, A>(vmax, i) : vi, a.c, amsgrad).alpha_sq;
    }
    acc += gi * gi / alpha_sq;
  }
  store_partial(ctx, a.partials, 1, 0, ctx.sum(acc));
}

struct PsspsApplyArgs {
  const int64_t* x; const int64_t* g; const int64_t* m; const int64_t* v; const int64_t* vmax;
  const int64_t* numels; const int32_t* bt; const int64_t* bs; const double* c; const double* coef;
  const double* decay; const int32_t* ok; const int64_t* sr_seeds;
};

template <typename X, typename S, bool SR, class Ctx>
LRF_HD void pssps_apply(Ctx& ctx, const PsspsApplyArgs& a, int64_t block, bool scaled, bool amsgrad, bool has_m) {
  using A = typename Acc<X>::type;
  if (*a.ok == 0) return;
  Span sp = span_of(ctx, a.numels, a.bt, a.bs, block);
  int64_t t = sp.t;
  X* x = slot_ptr<X>(a.x, t);
  const X* g = slot_ptr<const X>(a.g, t);
  S* m = slot_ptr<S>(a.m, t);
  S* v = slot_ptr<S>(a.v, t);
  S* vmax = slot_ptr<S>(a.vmax, t);
  A coef = A(a.coef[t]), decay = A(a.decay[t]), c1 = A(a.c[1]), bc1 = A(a.c[2]);
  Seeds<S, SR> seeds(a.sr_seeds, t);
  const uint32_t m_seed = seeds.state(kSaltExpAvg), v_seed = seeds.state(kSaltExpAvgSq);
  const uint32_t vmax_seed = seeds.state(kSaltMaxExpAvgSq);
  LRF_FOR(ctx, sp, i) {
    A xi = load<X, A>(x, i), gi = load<X, A>(g, i);
    A alpha_sq = A(1);
    if (scaled) {
      A vi = load<S, A>(v, i);
      Scale<A> sc = adam_scale<A>(gi, vi, amsgrad ? load<S, A>(vmax, i) : vi, a.c, amsgrad);
      alpha_sq = sc.alpha_sq;
      store_state(v, i, sc.v_new, v_seed);
      if (amsgrad) store_state(vmax, i, sc.vmax_new, vmax_seed);
    }
    A u;
    if (has_m) {
      A m_old = load<S, A>(m, i);
      A mi = m_old + c1 * (gi - m_old);
      store_state(m, i, mi, m_seed);
      u = (mi / bc1) / alpha_sq;
    } else {
      u = gi / alpha_sq;
    }
    u = u + decay * xi;
    store_param<X, SR, A>(x, i, xi - coef * u, seeds.param);
  }
}

}  // namespace lrfree
