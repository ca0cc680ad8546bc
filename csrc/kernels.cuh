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
// fixed order in fp64 — no atomics anywhere, so a step run twice is bit-identical.
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
};

template <typename X, class Ctx>
LRF_HD void sgd_apply(Ctx& ctx, const SgdApplyArgs& a, int64_t block, bool has_decay, bool track_best) {
  using A = typename Acc<X>::type;
  if (*a.ok == 0) return;
  Span s = span_of(ctx, a.numels, a.bt, a.bs, block);
  X* x = slot_ptr<X>(a.x, s.t);
  const X* g = slot_ptr<const X>(a.g, s.t);
  X* best = slot_ptr<X>(a.best, s.t);
  A coef = A(a.coef[s.t]), decay = has_decay ? A(a.decay[s.t]) : A(0);
  bool copy = track_best && *a.copy_best != 0;
  LRF_FOR(ctx, s, i) {
    A xi = load<X, A>(x, i), gi = load<X, A>(g, i);
    if (has_decay) gi = gi + decay * xi;
    if (copy) store<X, A>(best, i, xi);
    store<X, A>(x, i, xi - coef * gi);
  }
}

struct AdamArgs {
  const int64_t* x; const int64_t* g; const int64_t* m; const int64_t* v; const int64_t* vmax;
  const int64_t* numels; const int32_t* bt; const int64_t* bs; const double* table; const int32_t* ok;
};

template <typename X, class Ctx>
LRF_HD void adam(Ctx& ctx, const AdamArgs& a, int64_t block, bool decoupled, bool amsgrad) {
  using A = typename Acc<X>::type;
  if (*a.ok == 0) return;
  Span s = span_of(ctx, a.numels, a.bt, a.bs, block);
  // per tensor: (β1, 1−β1, β2, 1−β2, eps, wd, 1 − lr·wd, step size lr/bc1, √bc2, sign)
  const double* row = a.table + 10 * s.t;
  X* x = slot_ptr<X>(a.x, s.t);
  const X* g = slot_ptr<const X>(a.g, s.t);
  A* m = slot_ptr<A>(a.m, s.t);
  A* v = slot_ptr<A>(a.v, s.t);
  A* vmax = slot_ptr<A>(a.vmax, s.t);
  A b1 = A(row[0]), c1 = A(row[1]), b2 = A(row[2]), c2 = A(row[3]), eps = A(row[4]), wd = A(row[5]);
  A shrink = A(row[6]), lr = A(row[7]), sqrt_bc2 = A(row[8]), sign = A(row[9]);
  LRF_FOR(ctx, s, i) {
    A xi = load<X, A>(x, i), gi = load<X, A>(g, i) * sign;
    if (decoupled) xi = xi * shrink; else gi = gi + wd * xi;
    A mi = b1 * m[i] + c1 * gi;
    A vi = b2 * v[i] + c2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    if (amsgrad) { vi = vmax[i] > vi ? vmax[i] : vi; vmax[i] = vi; }
    A denom = sqrt(vi) / sqrt_bc2 + eps;
    store<X, A>(x, i, xi - lr * (mi / denom));
  }
}

struct DAdaptAdamArgs {
  const int64_t* x; const int64_t* g; const int64_t* s; const int64_t* m; const int64_t* v;
  const int64_t* numels; const int32_t* bt; const int64_t* bs; const double* eps; const double* decay;
  const double* scale; const double* adapting; const double* dlr; const int32_t* ok; void* partials;
  const double* coeffs;
};

template <typename X, class Ctx>
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
  A* s = slot_ptr<A>(a.s, t);
  A* m = slot_ptr<A>(a.m, t);
  A* v = slot_ptr<A>(a.v, t);
  A num = 0, l1 = 0;
  LRF_FOR(ctx, sp, i) {
    A xi = load<X, A>(x, i), mi = m[i], vi = v[i];
    if (adapting) {
      A gi = load<X, A>(g, i);
      if (!decouple) gi = gi + decay * xi;
      A si = s[i];
      num += gi * (si / (sqrt(vi) + eps));
      mi = b1 * mi + (scale * dlr * c1) * gi;
      vi = b2 * vi + c2 * gi * gi;
      si = sqrt_b2 * si + (dlr * c_sqrt_b2) * gi;
      l1 += fabs(si);
      if (accept) { m[i] = mi; v[i] = vi; s[i] = si; }
      if (decouple) xi = xi - decay * dlr * xi;  // decay = c·wd: part of the group's step
      if (accept) store<X, A>(x, i, xi - mi / (sqrt(vi) + eps));
    }  // lr = 0: the group's step is 0, x is left as it is
  }
  store_partial(ctx, a.partials, 2, 0, ctx.sum(num));
  store_partial(ctx, a.partials, 2, 1, ctx.sum(l1));
}

struct ProdigyStatsArgs {
  const int64_t* x; const int64_t* g; const int64_t* p0; const int64_t* s; const int64_t* m; const int64_t* v;
  const int64_t* numels; const int32_t* bt; const int64_t* bs; const int64_t* slices; const double* decay;
  const double* s_coef; const double* coeffs; const int32_t* ok; void* partials;
};

template <typename X, class Ctx>
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
  A* s = slot_ptr<A>(a.s, t);
  A* m = slot_ptr<A>(a.m, t);
  A* v = slot_ptr<A>(a.v, t);
  A num = 0, l1 = 0;
  LRF_FOR(ctx, sp, i) {
    A xi = load<X, A>(x, i), gi = load<X, A>(g, i);
    if (coupled) gi = gi + decay * xi;
    if (has_m) {
      A mi = b1 * m[i] + c1 * gi;
      if (accept) m[i] = mi;
    }
    A vi = b2 * v[i] + c2 * gi * gi;
    if (accept) v[i] = vi;
    if (i % stride == 0) {
      int64_t j = i / stride;
      A sj = b3 * s[j] + s_coef * gi;
      if (accept) s[j] = sj;
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
  const double* d_new; const int32_t* proceed;
};

template <typename X, class Ctx>
LRF_HD void prodigy_apply(Ctx& ctx, const ProdigyApplyArgs& a, int64_t block, bool coupled, bool has_m) {
  using A = typename Acc<X>::type;
  if (*a.proceed == 0) return;
  Span sp = span_of(ctx, a.numels, a.bt, a.bs, block);
  int64_t t = sp.t;
  // dlr: the tensor's step c·λ (its group's lr ratio times the shared step)
  A dlr = A(a.dlr[t]), d_new = A(*a.d_new), decay = A(a.decay[t]), eps = A(a.eps[t]);
  X* x = slot_ptr<X>(a.x, t);
  const X* g = slot_ptr<const X>(a.g, t);
  const A* m = slot_ptr<const A>(a.m, t);
  const A* v = slot_ptr<const A>(a.v, t);
  LRF_FOR(ctx, sp, i) {
    A xi = load<X, A>(x, i);
    A denom = sqrt(v[i]) + d_new * eps;
    A step;
    if (has_m) {
      step = dlr * m[i] / denom;
    } else {
      A gi = load<X, A>(g, i);
      if (coupled) gi = gi + decay * xi;
      step = dlr * d_new * gi / denom;
    }
    if (!coupled) xi = xi - decay * dlr * xi;
    store<X, A>(x, i, xi - step);
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
template <typename X, class Ctx>
LRF_HD void psdasgd_start(Ctx& ctx, const PsdasgdStartArgs& a, int64_t block, bool scaled, bool amsgrad) {
  using A = typename Acc<X>::type;
  double ratio_total = 0, alpha_total = 0;
  const int64_t end = *a.started != 0 ? 0 : a.n_blocks;
  for (int64_t b = ctx.pid; b < end; b += a.programs) {
    Span sp = block_span(b, a.numels, a.bt, a.bs, block);
    const X* g = slot_ptr<const X>(a.g, sp.t);
    const A* v = slot_ptr<const A>(a.v, sp.t);
    const A* vmax = slot_ptr<const A>(a.vmax, sp.t);
    A ratio = 0, alpha_sum = 0;
    LRF_FOR(ctx, sp, i) {
      A gi = load<X, A>(g, i);
      A alpha_sq = A(1);
      if (scaled) alpha_sq = adam_scale<A>(gi, v[i], amsgrad ? vmax[i] : v[i], a.c, amsgrad).alpha_sq;
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
};

template <typename X, class Ctx>
LRF_HD void psdasgd_step(Ctx& ctx, const PsdasgdStepArgs& a, int64_t block, bool scaled, bool amsgrad, bool has_m,
                         bool averaging) {
  using A = typename Acc<X>::type;
  Span sp = span_of(ctx, a.numels, a.bt, a.bs, block);
  int64_t t = sp.t;
  bool accept = *a.ok != 0;
  X* x = slot_ptr<X>(a.x, t);
  const X* g = slot_ptr<const X>(a.g, t);
  A* s = slot_ptr<A>(a.s, t);
  A* m = slot_ptr<A>(a.m, t);
  A* v = slot_ptr<A>(a.v, t);
  A* vmax = slot_ptr<A>(a.vmax, t);
  const X* x0 = slot_ptr<const X>(a.x0, t);
  // dlr: the tensor's step c·λ (its group's lr ratio times the shared step)
  A decay = A(a.decay[t]), dlr = A(a.dlr[t]), c1 = A(a.c[1]), bc1 = A(a.c[2]);
  // the tensor's group's primal averaging (μ, 1 − μ), per tensor
  A mu = A(a.averaging[2 * t]), one_minus_mu = A(a.averaging[2 * t + 1]);
  A dot = 0, snorm = 0, ratio_max = 0;
  LRF_FOR(ctx, sp, i) {
    A xi = load<X, A>(x, i), gi = load<X, A>(g, i), si = s[i];
    A alpha_sq = A(1), alpha_sq_prev = A(1);
    if (scaled) {
      Scale<A> sc = adam_scale<A>(gi, v[i], amsgrad ? vmax[i] : v[i], a.c, amsgrad);
      alpha_sq = sc.alpha_sq;
      alpha_sq_prev = sc.alpha_sq_prev;
      if (accept) {
        v[i] = sc.v_new;
        if (amsgrad) vmax[i] = sc.vmax_new;
      }
    }
    A u;
    if (has_m) {
      A mi = m[i] + c1 * (gi - m[i]);
      if (accept) m[i] = mi;
      u = (mi / bc1) / alpha_sq;
    } else {
      u = gi / alpha_sq;
    }
    u = u + decay * xi;
    dot += gi * si;
    si = si + dlr * u;
    if (accept) s[i] = si;
    snorm += alpha_sq * si * si;
    A r = alpha_sq_prev / alpha_sq;
    ratio_max = r > ratio_max ? r : ratio_max;
    if (averaging) xi = xi * mu + (load<X, A>(x0, i) - si) * one_minus_mu;
    else xi = xi - dlr * u;
    if (accept) store<X, A>(x, i, xi);
  }
  store_partial(ctx, a.partials, 3, 0, ctx.sum(dot));
  store_partial(ctx, a.partials, 3, 1, ctx.sum(snorm));
  store_partial(ctx, a.partials, 3, 2, ctx.max(ratio_max));
}

struct PsspsStatsArgs {
  const int64_t* g; const int64_t* v; const int64_t* vmax; const int64_t* numels; const int32_t* bt;
  const int64_t* bs; const double* c; void* partials;
};

template <typename X, class Ctx>
LRF_HD void pssps_stats(Ctx& ctx, const PsspsStatsArgs& a, int64_t block, bool scaled, bool amsgrad) {
  using A = typename Acc<X>::type;
  Span sp = span_of(ctx, a.numels, a.bt, a.bs, block);
  const X* g = slot_ptr<const X>(a.g, sp.t);
  const A* v = slot_ptr<const A>(a.v, sp.t);
  const A* vmax = slot_ptr<const A>(a.vmax, sp.t);
  A acc = 0;
  LRF_FOR(ctx, sp, i) {
    A gi = load<X, A>(g, i);
    A alpha_sq = A(1);
    if (scaled) alpha_sq = adam_scale<A>(gi, v[i], amsgrad ? vmax[i] : v[i], a.c, amsgrad).alpha_sq;
    acc += gi * gi / alpha_sq;
  }
  store_partial(ctx, a.partials, 1, 0, ctx.sum(acc));
}

struct PsspsApplyArgs {
  const int64_t* x; const int64_t* g; const int64_t* m; const int64_t* v; const int64_t* vmax;
  const int64_t* numels; const int32_t* bt; const int64_t* bs; const double* c; const double* coef;
  const double* decay; const int32_t* ok;
};

template <typename X, class Ctx>
LRF_HD void pssps_apply(Ctx& ctx, const PsspsApplyArgs& a, int64_t block, bool scaled, bool amsgrad, bool has_m) {
  using A = typename Acc<X>::type;
  if (*a.ok == 0) return;
  Span sp = span_of(ctx, a.numels, a.bt, a.bs, block);
  int64_t t = sp.t;
  X* x = slot_ptr<X>(a.x, t);
  const X* g = slot_ptr<const X>(a.g, t);
  A* m = slot_ptr<A>(a.m, t);
  A* v = slot_ptr<A>(a.v, t);
  A* vmax = slot_ptr<A>(a.vmax, t);
  A coef = A(a.coef[t]), decay = A(a.decay[t]), c1 = A(a.c[1]), bc1 = A(a.c[2]);
  LRF_FOR(ctx, sp, i) {
    A xi = load<X, A>(x, i), gi = load<X, A>(g, i);
    A alpha_sq = A(1);
    if (scaled) {
      Scale<A> sc = adam_scale<A>(gi, v[i], amsgrad ? vmax[i] : v[i], a.c, amsgrad);
      alpha_sq = sc.alpha_sq;
      v[i] = sc.v_new;
      if (amsgrad) vmax[i] = sc.vmax_new;
    }
    A u;
    if (has_m) {
      A mi = m[i] + c1 * (gi - m[i]);
      m[i] = mi;
      u = (mi / bc1) / alpha_sq;
    } else {
      u = gi / alpha_sq;
    }
    u = u + decay * xi;
    store<X, A>(x, i, xi - coef * u);
  }
}

}  // namespace lrfree
