// The CPU kernels of the fused GroupNorm(-scale-shift)-SiLU ops, included by
// gn_silu_avx2.cpp and gn_silu_avx512.cpp, which compile them for two
// instruction sets (at::vec::Vectorized<float> is 8 or 16 lanes wide); the
// ops in gn_silu_cpu.cpp pick one at run time from what the CPU supports.
//
// Without SiLU (GnShape::silu false) the same kernels compute a plain
// GroupNorm (the attention blocks' norm).
//
// Forward: per (sample, group) the statistics (contiguous layout: one pass
// of sums shifted by the group's first value, stable for inputs far from
// zero mean; channels-last: two passes, the mean, then the squared
// deviations around it) and one pass writing
//   y = SiLU((x - mean) * a + b),   a = rstd * w * (1 + scale),
//                                   b = bias * (1 + scale) + shift,
// with a and b folded per (sample, channel), so the scale-shift variant costs
// the same as the plain one (x is centred first: folding the mean into b
// would cost precision when |mean| * rstd is large). A group's data is a few
// KiB to a few MiB, so the passes after the first mostly hit the cache:
// memory traffic is one read of x and one write of y.
//
// Backward: one pass computes dz = dy * SiLU'(z) into a per-thread buffer and
// the per-(sample, channel) sums of dz * (x - mean) and dz; the GroupNorm
// backward is then closed-form in those sums, and a second pass over the
// buffer writes
//   dx = w * (1 + scale) * rstd * dz + c2 * (x - mean) + c3   (c2, c3 per group).
//
// Both layouts are native: contiguous [N, C, L] (tasks per (sample, group),
// vectorised along L) and channels-last [N, L, C] (tasks per sample,
// vectorised along C). Statistics and all math are float32 (float64 for
// float64 inputs); partial sums are flushed into float64 every few thousand
// elements.
//
// at::vec::Vectorized<float> uses AVX2/FMA only when this file is compiled
// with -mavx2 -mfma -DCPU_CAPABILITY_AVX2 (setup.py and the loader do); the
// Python loader refuses to load the library on CPUs without AVX2.
// The includer defines IDDPM_GN_NS, the namespace of the entry points.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../gn_silu_shape.h"

namespace iddpm_fast {
namespace IDDPM_GN_NS {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
// Elements (contiguous layout) or positions (channels-last) summed in float
// before the partial sum is added into a float64 total.
constexpr int64_t kFlush = 2048;
constexpr int64_t kFlushPositions = 128;

template <typename T>
constexpr bool kVectorised = !std::is_same_v<T, double>;
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
inline Vec vload(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

template <typename T>
inline void vstore(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, kV);
  }
}

// The last n < kV elements of a row, zero-padded to a vector, and a vector
// stored back to n elements: rows whose length is not a multiple of the
// vector width (2x2, 7x7, 14x14 maps, 1-D attention rows) go through the
// vector code to the end (a scalar std::exp per leftover element had made a
// 2x2 map ~10x slower per element than an 8x8 one).
template <typename T>
inline Vec vload_tail(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    T buf[kV];
    std::fill_n(buf, kV, T(0.f));
    std::copy_n(p, n, buf);
    return vload(buf);
  }
}

template <typename T>
inline void vstore_tail(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    T buf[kV];
    vstore(buf, v);
    std::copy_n(buf, n, p);
  }
}

// 1 / d for d >= 1: the hardware reciprocal estimate refined by Newton
// steps (~1 ulp); a full-precision division made the op compute-bound.
// AVX2's estimate has 12 bits: after one step r (2 - d r), 1 / 1 came out as
// 1 - 6e-8, and the SiLU derivative's z * (1 - sigmoid(z)) was then off by
// 6e-8 * z for large z. A second step in the form r + r (1 - d r), whose
// correction 1 - d r an FMA computes exactly, lands on 1 (a second
// r (2 - d r) does not: 2 - d r rounds back to 1). AVX-512's 14-bit
// estimate gives exactly 1 after one step.
inline Vec vrecip(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 dv = d;
  const __m512 r = _mm512_rcp14_ps(dv);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(dv, r, _mm512_set1_ps(2.f)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 dv = d, one = _mm256_set1_ps(1.f);
  __m256 r = _mm256_rcp_ps(dv);
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(dv, r, _mm256_set1_ps(2.f)));
  return _mm256_fmadd_ps(r, _mm256_fnmadd_ps(dv, r, one), r);
#else
  return Vec(1.f) / d;
#endif
}

// sigmoid(z) = 1 / (1 + exp(-z)), with exp inline (Sleef's is an out-of-line
// call). exp's argument is capped at 80 so that 1 + exp(-z) stays finite, and
// sigmoid is set to 0 for z < -80 (its true value is under 2e-35): with the
// cap alone z * sigmoid(z) would grow with |z| (-180 at z = -1e37). A NaN z
// compares false there and gives a NaN SiLU; z = -inf gives 0 * -inf = NaN,
// as x * torch.sigmoid(x) does.
inline Vec vsigmoid(const Vec& z) {
  // exp(-z) = 2^n 2^f with n = round(-z log2 e) and f in [-1/2, 1/2]: 2^f by
  // Cephes' exp2f polynomial (relative error 1.7e-7, below exp_u20's ~2e-6),
  // 2^n applied by scalef (AVX-512) or built in the exponent bits (AVX2, with
  // -z kept above -87 so that 2^n stays a normal number; sigmoid is 1 in
  // float32 there anyway). About 11 instructions where exp_u20 takes about 20
  // (the SiLU had been ~40% of the op's time). On AVX-512 a z of exactly +inf
  // (an infinite bias or weight) takes the polynomial through NaN and comes
  // out as torch's inf only because scalef(NaN, -inf) gives 0 on the CPUs
  // tried: a floor on -z would make it certain but cost a few percent of the
  // op for that case alone.
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kP[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                           5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.f};
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 zv = z;
  // t = min(-z, 80) * log2e as min(z * -log2e, 80 * log2e): one instruction
  // fewer, the same value (rounding is monotonic).
  const __m512 t = _mm512_min_ps(_mm512_mul_ps(zv, _mm512_set1_ps(-kLog2e)), _mm512_set1_ps(80.f * kLog2e));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kP[0]);
  for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP[k]));
  // 1 / d as vrecip computes it, its last multiply zeroing the lanes with z < -80 (or NaN).
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.f));
  const __m512 r = _mm512_rcp14_ps(d);
  const __mmask16 keep = _mm512_cmp_ps_mask(zv, _mm512_set1_ps(-80.f), _CMP_GE_OQ);
  return _mm512_maskz_mul_ps(keep, r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 zv = z;
  const __m256 t = _mm256_max_ps(
      _mm256_min_ps(_mm256_mul_ps(zv, _mm256_set1_ps(-kLog2e)), _mm256_set1_ps(80.f * kLog2e)),
      _mm256_set1_ps(-87.f * kLog2e));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kP[0]);
  for (int k = 1; k < 7; ++k) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP[k]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  const __m256 s = vrecip(Vec(_mm256_add_ps(e, _mm256_set1_ps(1.f))));
  return _mm256_and_ps(_mm256_cmp_ps(zv, _mm256_set1_ps(-80.f), _CMP_GE_OQ), s);
#else
  const Vec one(1.f);
  const Vec s = vrecip(one + at::vec::minimum(z.neg(), Vec(80.f)).exp_u20());
  return Vec::blendv(s, Vec(0.f), z < Vec(-80.f));
#endif
}

template <typename A>
inline A sigmoid(A z) {
  return A(1) / (A(1) + std::exp(-z));
}

// The sum of v's lanes in float64 (exact for float lanes of similar
// magnitude): widened to double vectors and added by a shuffle tree, where a
// store and a lane-by-lane float64 sum made one dependent chain per group
// (about as long as a 4x4 group's output).
inline double lanes_sum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256d four = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                     _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  __m128d two = _mm_add_pd(_mm256_castpd256_pd128(four), _mm256_extractf128_pd(four, 1));
  return _mm_cvtsd_f64(_mm_add_sd(two, _mm_unpackhi_pd(two, two)));
#else
  float lanes[kV];
  v.store(lanes);
  double total = 0;
  for (int64_t i = 0; i < kV; ++i) total += lanes[i];
  return total;
#endif
}

// One pass: sum of (x - k) and of (x - k)^2 over x[0:n], k a value from the
// data (its first element), so that both sums stay small for inputs far from
// zero mean; mean = k + s1 / n, var = (s2 - s1^2 / n) / n.
template <typename T>
void block_shifted_moments(const T* x, int64_t n, double& s1_out, double& s2_out, double& shift) {
  using A = acc_t<T>;
  const A k = static_cast<A>(x[0]);
  shift = static_cast<double>(k);
  double s1 = 0, s2 = 0;
  for (int64_t start = 0; start < n; start += kFlush) {
    const int64_t m = std::min(kFlush, n - start);
    const T* p = x + start;
    int64_t j = 0;
    double p1 = 0, p2 = 0;
    if constexpr (kVectorised<T>) {
      Vec a0(0.f), a1(0.f), q0(0.f), q1(0.f);
      const Vec kv(k);
      for (; j + 2 * kV <= m; j += 2 * kV) {
        Vec d0 = vload(p + j) - kv, d1 = vload(p + j + kV) - kv;
        a0 = a0 + d0;
        a1 = a1 + d1;
        q0 = at::vec::fmadd(d0, d0, q0);
        q1 = at::vec::fmadd(d1, d1, q1);
      }
      for (; j + kV <= m; j += kV) {
        Vec d0 = vload(p + j) - kv;
        a0 = a0 + d0;
        q0 = at::vec::fmadd(d0, d0, q0);
      }
      p1 = lanes_sum(a0 + a1);
      p2 = lanes_sum(q0 + q1);
    }
    A t1 = 0, t2 = 0;
    for (; j < m; ++j) {
      A d = static_cast<A>(p[j]) - k;
      t1 += d;
      t2 = std::fma(d, d, t2);
    }
    s1 += p1 + t1;
    s2 += p2 + t2;
  }
  s1_out = s1;
  s2_out = s2;
}

// Sums over positions [start, stop) of B consecutive channel vectors from
// channel c: acc[i] = sum of (x[l, c + i kV ...] - center) (or its square
// when Sq), each channel summed position by position in float. B independent
// chains per position keep the adds from waiting on each other.
template <bool Sq, int B, typename T>
inline __attribute__((always_inline)) void channel_block_moment(const T* x, int64_t start, int64_t stop, int64_t C,
                                                                int64_t c, const float* center, Vec* acc) {
  Vec cv[B];
  for (int i = 0; i < B; ++i) {
    cv[i] = center != nullptr ? Vec::loadu(center + c + i * kV) : Vec(0.f);
    acc[i] = Vec(0.f);
  }
  for (int64_t l = start; l < stop; ++l) {
    const T* row = x + l * C + c;
    for (int i = 0; i < B; ++i) {
      const Vec d = vload(row + i * kV) - cv[i];
      if constexpr (Sq) {
        acc[i] = at::vec::fmadd(d, d, acc[i]);
      } else {
        acc[i] = acc[i] + d;
      }
    }
  }
}

// out[c] += sum over positions l in [0, m) of (x[l, c] - center[c]) (or its
// square when Sq); x is [m, C] with channels contiguous; center may be null.
// Each channel is summed in float over kFlushPositions positions at a time,
// in position order, then added into out (float64). The loops run channel
// block by channel block down the positions (strided by C), accumulating in
// registers: a per-position pass through a scratch row (a load and a store
// per vector besides x's) had been most of the statistics' cost.
template <bool Sq, typename T>
void rows_moment(const T* x, int64_t m, int64_t C, const acc_t<T>* center, double* out, acc_t<T>* scratch) {
  using A = acc_t<T>;
  for (int64_t start = 0; start < m; start += kFlushPositions) {
    const int64_t stop = std::min(m, start + kFlushPositions);
    int64_t c0 = 0;
    if constexpr (kVectorised<T>) {
      constexpr int B = 4;
      Vec acc[B];
      for (; c0 + B * kV <= C; c0 += B * kV) {
        channel_block_moment<Sq, B>(x, start, stop, C, c0, center, acc);
        for (int i = 0; i < B; ++i) acc[i].store(scratch + c0 + i * kV);
      }
      for (; c0 + kV <= C; c0 += kV) {
        channel_block_moment<Sq, 1>(x, start, stop, C, c0, center, acc);
        acc[0].store(scratch + c0);
      }
    }
    for (int64_t c = c0; c < C; ++c) {
      A s = 0;
      for (int64_t l = start; l < stop; ++l) {
        const A d = static_cast<A>(x[l * C + c]) - (center != nullptr ? center[c] : A(0));
        s = Sq ? std::fma(d, d, s) : s + d;
      }
      scratch[c] = s;
    }
    for (int64_t c = 0; c < C; ++c) out[c] += scratch[c];
  }
}

// y = SiLU((x - m) * a + b) over n elements (without the SiLU unless Act);
// m, a, b per element when PerElem, else m[0], a[0], b[0] for all. Centering
// before scaling keeps the error at ulp((x - mean) * rstd) even when
// |mean| * rstd is large.
template <bool Act, bool PerElem, typename T>
void forward_row(T* y, const T* x, int64_t n, const acc_t<T>* m, const acc_t<T>* a, const acc_t<T>* b,
                 int64_t pf = 0) {
  using A = acc_t<T>;
  int64_t j = 0;
  if constexpr (kVectorised<T>) {
    const Vec m0(PerElem ? 0.f : m[0]), a0(PerElem ? 0.f : a[0]), b0(PerElem ? 0.f : b[0]);
    for (; j + kV <= n; j += kV) {
      if (pf) __builtin_prefetch(x + j + pf, 0, 3);
      Vec mv = PerElem ? Vec::loadu(m + j) : m0;
      Vec av = PerElem ? Vec::loadu(a + j) : a0;
      Vec bv = PerElem ? Vec::loadu(b + j) : b0;
      Vec z = at::vec::fmadd(vload(x + j) - mv, av, bv);
      vstore(y + j, Act ? z * vsigmoid(z) : z);
    }
    if (j < n) {
      const int64_t r = n - j;
      Vec mv = PerElem ? Vec::loadu(m + j, r) : m0;
      Vec av = PerElem ? Vec::loadu(a + j, r) : a0;
      Vec bv = PerElem ? Vec::loadu(b + j, r) : b0;
      Vec z = at::vec::fmadd(vload_tail(x + j, r) - mv, av, bv);
      vstore_tail(y + j, Act ? z * vsigmoid(z) : z, r);
      j = n;
    }
  }
  for (; j < n; ++j) {
    const int64_t i = PerElem ? j : 0;
    A z = std::fma(static_cast<A>(x[j]) - m[i], a[i], b[i]);
    y[j] = static_cast<T>(Act ? z * sigmoid(z) : z);
  }
}

// A contiguous group: D rows of L elements, y = SiLU((x - m) * a[d] + b[d])
// on row d. Rows of exactly one vector (4x4 maps on AVX-512, ...) go two at a
// time: one row's sigmoid is a chain of ~15 dependent instructions, and two
// independent chains per iteration keep the FMA units busy where one row per
// call had left them waiting.
template <bool Act, typename T>
void forward_group(T* y, const T* x, int64_t D, int64_t L, acc_t<T> m, const acc_t<T>* a, const acc_t<T>* b,
                   int64_t pf) {
  int64_t d = 0;
  if constexpr (kVectorised<T>) {
    if (L == kV) {
      const Vec mv(m);
      for (; d + 2 <= D; d += 2) {
        if (pf) {
          __builtin_prefetch(x + d * L + pf, 0, 3);
          __builtin_prefetch(x + (d + 1) * L + pf, 0, 3);
        }
        const Vec z0 = at::vec::fmadd(vload(x + d * L) - mv, Vec(a[d]), Vec(b[d]));
        const Vec z1 = at::vec::fmadd(vload(x + (d + 1) * L) - mv, Vec(a[d + 1]), Vec(b[d + 1]));
        vstore(y + d * L, Act ? z0 * vsigmoid(z0) : z0);
        vstore(y + (d + 1) * L, Act ? z1 * vsigmoid(z1) : z1);
      }
    }
  }
  for (; d < D; ++d) {
    forward_row<Act, false>(y + d * L, x + d * L, L, &m, a + d, b + d, pf);
  }
}

// dz = dy * SiLU'(z) with z = xc * a + b (dz = dy unless Act): the
// backward's per-vector step, shared by its row and channel-block loops.
template <bool Act>
inline __attribute__((always_inline)) Vec vdz(const Vec& dy, const Vec& xc, const Vec& av, const Vec& bv) {
  if constexpr (Act) {
    const Vec one(1.f);
    const Vec z = at::vec::fmadd(xc, av, bv);
    const Vec s = vsigmoid(z);
    return dy * s * at::vec::fmadd(z, one - s, one);
  } else {
    return dy;
  }
}

// Software prefetch in the contiguous layout's passes. Groups are a few KiB
// to a few hundred KiB, and the hardware prefetcher, which stops at 4 KiB
// page boundaries and idles while a pass computes from the cache, left the
// first pass over each group waiting on memory:
// - the backward's first pass fetches x and dy kBackwardPrefetch elements
//   ahead, and the lines of dx it will write in its second pass (a group of
//   at most kPrefetchOutputBytes, so that its four streams stay in L2): with
//   the lines owned before the stores, dx is written without a read for
//   ownership stalling each store;
// - the forward's output pass fetches the next batch of groups' x.
// On one core the backward went 1.1-1.45x faster from 8x8 to 64x64 maps,
// the forward 1.05-1.5x (A/B of builds, float32).
constexpr int64_t kBackwardPrefetch = 256;
constexpr int64_t kPrefetchOutputBytes = 128 * 1024;
// dz = dy * SiLU'(z) (dz = dy unless Act), z = (x - m) a + b, over the
// elements [j, stop) (vectors, the last one zero-padded), into dz; adds the
// lane-wise sums of dz * (x - m) and of dz into as, ab.
template <bool Act, typename T>
inline __attribute__((always_inline)) void backward_block_vec(float* dz, const T* dy, const T* x, int64_t j,
                                                              int64_t stop, const Vec& mv, const Vec& av,
                                                              const Vec& bv, Vec& as, Vec& ab, T* dxw = nullptr) {
  for (; j + kV <= stop; j += kV) {
    __builtin_prefetch(x + j + kBackwardPrefetch, 0, 3);
    __builtin_prefetch(dy + j + kBackwardPrefetch, 0, 3);
    if (dxw) __builtin_prefetch(dxw + j, 1, 3);
    const Vec xc = vload(x + j) - mv;
    const Vec d = vdz<Act>(vload(dy + j), xc, av, bv);
    d.store(dz + j);
    as = at::vec::fmadd(d, xc, as);
    ab = ab + d;
  }
  if (j < stop) {
    // The padding lanes are zeroed before they reach the sums (an infinite
    // mean would make them NaN).
    const int64_t r = stop - j;
    Vec xc = vload_tail(x + j, r) - mv;
    Vec d = vdz<Act>(vload_tail(dy + j, r), xc, av, bv);
    d = Vec::set(Vec(0.f), d, r);
    xc = Vec::set(Vec(0.f), xc, r);
    d.store(dz + j, r);
    as = at::vec::fmadd(d, xc, as);
    ab = ab + d;
  }
}

// out[i] = the sum of v[i]'s lanes, for kV vectors v[0..kV): a transpose-and-
// add tree, 45 shuffles and adds for 16 sums on AVX-512 (21 for 8 on AVX2)
// where one tree per vector takes 8 (6) each. Backward rows of a few vectors
// (4x4 and 8x8 maps) had spent a quarter of their time in per-row trees.
inline void reduce_lanes(const Vec* v, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 w[8], x4[4], y2[2];
  for (int i = 0; i < 8; ++i) {  // w[i]: v[2i] folded to 8 lanes, then v[2i+1]
    const __m512 a = v[2 * i], b = v[2 * i + 1];
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // x4[i]: blocks of 4 lanes of v[4i], v[4i+1], v[4i+2], v[4i+3]
    x4[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                          _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // y2[i], block k: 2 lanes of v[8i+k], 2 of v[8i+4+k]
    y2[i] = _mm512_add_ps(_mm512_shuffle_ps(x4[2 * i], x4[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_ps(x4[2 * i], x4[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // z, block k: the sums of v[k], v[4+k], v[8+k], v[12+k].
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y2[0], y2[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(y2[0], y2[1], _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, z);
  for (int k = 0; k < 4; ++k) {
    for (int j = 0; j < 4; ++j) out[k + 4 * j] = lanes[4 * k + j];
  }
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 w[4], y2[2];
  for (int i = 0; i < 4; ++i) {  // w[i]: v[2i] folded to 4 lanes, then v[2i+1]
    const __m256 a = v[2 * i], b = v[2 * i + 1];
    w[i] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  for (int i = 0; i < 2; ++i) {  // y2[i], half k: 2 lanes of v[4i+k], 2 of v[4i+2+k]
    y2[i] = _mm256_add_ps(_mm256_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm256_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // z, half k: the sums of v[k], v[2+k], v[4+k], v[6+k].
  const __m256 z = _mm256_add_ps(_mm256_shuffle_ps(y2[0], y2[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(y2[0], y2[1], _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, z);
  for (int k = 0; k < 2; ++k) {
    for (int j = 0; j < 4; ++j) out[k + 2 * j] = lanes[4 * k + j];
  }
#else
  const auto plus = [](const Vec& u, const Vec& w) { return u + w; };
  for (int64_t i = 0; i < kV; ++i) out[i] = at::vec::vec_reduce_all<float>(plus, v[i]);
#endif
}

// dz = dy * SiLU'(z) (dz = dy unless Act), z = (x - m) a + b with scalars
// m, a, b, into dz[0:n]; adds sum(dz * (x - m)) and sum(dz) into ds, db
// (float64, flushed every kFlush elements).
template <bool Act, typename T>
inline __attribute__((always_inline)) void backward_row_scalar(acc_t<T>* dz, const T* dy, const T* x, int64_t n,
                                                               acc_t<T> m, acc_t<T> a, acc_t<T> b, double& ds,
                                                               double& db, T* dxw = nullptr) {
  using A = acc_t<T>;
  for (int64_t start = 0; start < n; start += kFlush) {
    const int64_t stop = std::min(n, start + kFlush);
    int64_t j = start;
    double ps = 0, pb = 0;
    if constexpr (kVectorised<T>) {
      Vec as(0.f), ab(0.f);
      backward_block_vec<Act>(dz, dy, x, j, stop, Vec(m), Vec(a), Vec(b), as, ab, dxw);
      j = stop;
      // Shuffle-tree horizontal sums: on 8x8 rows (64 elements) a lane-by-
      // lane float64 sum cost about as much as the row.
      const auto plus = [](const Vec& u, const Vec& v) { return u + v; };
      ps = at::vec::vec_reduce_all<float>(plus, as);
      pb = at::vec::vec_reduce_all<float>(plus, ab);
    }
    A ts = 0, tb = 0;
    for (; j < stop; ++j) {
      A xc = static_cast<A>(x[j]) - m;
      A d = static_cast<A>(dy[j]);
      if constexpr (Act) {
        A z = std::fma(xc, a, b);
        A s = sigmoid(z);
        d = d * s * std::fma(z, A(1) - s, A(1));
      }
      dz[j] = d;
      ts = std::fma(d, xc, ts);
      tb += d;
    }
    ds += ps + ts;
    db += pb + tb;
  }
}

// A contiguous group's first backward pass, rows of at most kFlush elements
// (maps up to 45x45): backward_row_scalar's dz and sums, the rows' sums
// reduced kV / 2 channels at a time by reduce_lanes. dz is the group's
// [D, L] buffer; ds, db get the D channels' sums.
template <bool Act, typename T>
void backward_group_sums(float* dz, const T* dy, const T* x, int64_t D, int64_t L, float m, const float* a,
                         const float* b, double* ds, double* db, T* dxw) {
  constexpr int64_t H = kV / 2;
  Vec acc[kV];
  float sums[kV];
  const Vec mv(m);
  for (int64_t d0 = 0; d0 < D; d0 += H) {
    const int64_t h = std::min(H, D - d0);
    for (int64_t i = 0; i < H; ++i) {
      acc[i] = Vec(0.f);
      acc[H + i] = Vec(0.f);
    }
    for (int64_t i = 0; i < h; ++i) {
      // Local accumulators: stores to dz may alias acc[] (vector types may
      // alias anything), which would keep them in memory inside the row loop.
      const int64_t d = d0 + i;
      Vec as(0.f), ab(0.f);
      backward_block_vec<Act>(dz + d * L, dy + d * L, x + d * L, 0, L, mv, Vec(a[d]), Vec(b[d]), as, ab,
                              dxw ? dxw + d * L : nullptr);
      acc[i] = as;
      acc[H + i] = ab;
    }
    reduce_lanes(acc, sums);
    for (int64_t i = 0; i < h; ++i) {
      ds[d0 + i] = sums[i];
      db[d0 + i] = sums[H + i];
    }
  }
}

// The same with m, a, b per channel along a channels-last row of C
// channels; sums go into per-channel scratch arrays ss, sb.
template <bool Act, typename T>
void backward_row_channels(acc_t<T>* dz, const T* dy, const T* x, int64_t C, const acc_t<T>* m,
                           const acc_t<T>* a, const acc_t<T>* b, acc_t<T>* ss, acc_t<T>* sb) {
  using A = acc_t<T>;
  int64_t c = 0;
  if constexpr (kVectorised<T>) {
    for (; c + kV <= C; c += kV) {
      const Vec xc = vload(x + c) - Vec::loadu(m + c);
      const Vec d = vdz<Act>(vload(dy + c), xc, Vec::loadu(a + c), Vec::loadu(b + c));
      d.store(dz + c);
      at::vec::fmadd(d, xc, Vec::loadu(ss + c)).store(ss + c);
      (Vec::loadu(sb + c) + d).store(sb + c);
    }
  }
  for (; c < C; ++c) {
    A xc = static_cast<A>(x[c]) - m[c];
    A d = static_cast<A>(dy[c]);
    if constexpr (Act) {
      A z = std::fma(xc, a[c], b[c]);
      A s = sigmoid(z);
      d = d * s * std::fma(z, A(1) - s, A(1));
    }
    dz[c] = d;
    ss[c] = std::fma(d, xc, ss[c]);
    sb[c] += d;
  }
}

// dx = k * dz + c2 * (x - m) + c3 over n elements (per element or broadcast).
template <bool PerElem, typename T>
void dx_row(T* dx, const acc_t<T>* dz, const T* x, int64_t n, const acc_t<T>* m, const acc_t<T>* k,
            const acc_t<T>* c2, const acc_t<T>* c3) {
  using A = acc_t<T>;
  int64_t j = 0;
  if constexpr (kVectorised<T>) {
    const Vec m0(PerElem ? 0.f : m[0]), k0(PerElem ? 0.f : k[0]), c20(PerElem ? 0.f : c2[0]),
        c30(PerElem ? 0.f : c3[0]);
    for (; j + kV <= n; j += kV) {
      Vec mv = PerElem ? Vec::loadu(m + j) : m0;
      Vec kv = PerElem ? Vec::loadu(k + j) : k0;
      Vec c2v = PerElem ? Vec::loadu(c2 + j) : c20;
      Vec c3v = PerElem ? Vec::loadu(c3 + j) : c30;
      Vec out = at::vec::fmadd(kv, Vec::loadu(dz + j), at::vec::fmadd(c2v, vload(x + j) - mv, c3v));
      vstore(dx + j, out);
    }
    if (j < n) {
      const int64_t r = n - j;
      Vec mv = PerElem ? Vec::loadu(m + j, r) : m0;
      Vec kv = PerElem ? Vec::loadu(k + j, r) : k0;
      Vec c2v = PerElem ? Vec::loadu(c2 + j, r) : c20;
      Vec c3v = PerElem ? Vec::loadu(c3 + j, r) : c30;
      Vec out = at::vec::fmadd(kv, Vec::loadu(dz + j, r), at::vec::fmadd(c2v, vload_tail(x + j, r) - mv, c3v));
      vstore_tail(dx + j, out, r);
      j = n;
    }
  }
  for (; j < n; ++j) {
    const int64_t i = PerElem ? j : 0;
    dx[j] = static_cast<T>(std::fma(k[i], dz[j], std::fma(c2[i], static_cast<A>(x[j]) - m[i], c3[i])));
  }
}

// Channels-last passes, channel block by channel block: B consecutive
// channel vectors from channel c, walked down the positions (stride C) with
// their per-channel coefficients and sums in registers. The row-by-row
// versions (forward_row / backward_row_channels / dx_row over a whole row of
// C channels) load those coefficients again for every position, and the
// backward's sums went through memory too: a load and a store each, per
// vector, on top of the data. Channels past the last full vector go through
// the row functions. kBlock vectors per block: 4 with AVX-512's 32
// registers, 2 with AVX2's 16.
constexpr int kBlock = kV == 16 ? 4 : 2;
// The backward's passes are blocked with AVX-512 only: with AVX2 they were
// 10-15% slower than row by row in float32 (at 8x8 and 32x32; bfloat16 the
// same), with blocks of two channel vectors or one.
constexpr bool kBlockedBackward = kV == 16;
// Positions per tile: the blocks walk a tile's rows (16 rows of C channels:
// 16 KiB at C = 256 in float32) before the next tile, so that the passes read
// and write a compact region, not one column of blocks over the whole map
// (that had made the float32 backward at 8x8 slower than row by row).
constexpr int64_t kTile = 16;

// y[l, c...] = SiLU((x - m) a + b) for positions [0, L).
template <bool Act, int B, typename T>
inline __attribute__((always_inline)) void forward_channel_block(T* y, const T* x, int64_t l0, int64_t l1, int64_t C,
                                                                 int64_t c, const float* m, const float* a,
                                                                 const float* b, int64_t pf) {
  Vec mv[B], av[B], bv[B];
  for (int i = 0; i < B; ++i) {
    mv[i] = Vec::loadu(m + c + i * kV);
    av[i] = Vec::loadu(a + c + i * kV);
    bv[i] = Vec::loadu(b + c + i * kV);
  }
  for (int64_t l = l0; l < l1; ++l) {
    const int64_t o = l * C + c;
    for (int i = 0; i < B; ++i) {
      if (pf) __builtin_prefetch(x + o + i * kV + pf, 0, 3);
      const Vec z = at::vec::fmadd(vload(x + o + i * kV) - mv[i], av[i], bv[i]);
      vstore(y + o + i * kV, Act ? z * vsigmoid(z) : z);
    }
  }
}

template <bool Act, typename T>
void forward_channels(T* y, const T* x, int64_t L, int64_t C, const acc_t<T>* m, const acc_t<T>* a,
                      const acc_t<T>* b, int64_t pf) {
  for (int64_t l0 = 0; l0 < L; l0 += kTile) {
    const int64_t l1 = std::min(L, l0 + kTile);
    int64_t c = 0;
    if constexpr (kVectorised<T>) {
      for (; c + kBlock * kV <= C; c += kBlock * kV) {
        forward_channel_block<Act, kBlock>(y, x, l0, l1, C, c, m, a, b, pf);
      }
      for (; c + kV <= C; c += kV) forward_channel_block<Act, 1>(y, x, l0, l1, C, c, m, a, b, pf);
    }
    if (c < C) {
      for (int64_t l = l0; l < l1; ++l) {
        forward_row<Act, true>(y + l * C + c, x + l * C + c, C - c, m + c, a + c, b + c, pf);
      }
    }
  }
}

// Positions [start, stop): dz = dy * SiLU'(z), and ss[c...] = sum of
// dz * (x - m), sb[c...] = sum of dz (float, position by position).
template <bool Act, int B, typename T>
inline __attribute__((always_inline)) void backward_channel_block(float* dz, const T* dy, const T* x, int64_t start,
                                                                  int64_t stop, int64_t C, int64_t c, const float* m,
                                                                  const float* a, const float* b, float* ss,
                                                                  float* sb, bool first, T* dxw) {
  Vec mv[B], av[B], bv[B], as[B], ab[B];
  for (int i = 0; i < B; ++i) {
    mv[i] = Vec::loadu(m + c + i * kV);
    av[i] = Vec::loadu(a + c + i * kV);
    bv[i] = Vec::loadu(b + c + i * kV);
    as[i] = first ? Vec(0.f) : Vec::loadu(ss + c + i * kV);
    ab[i] = first ? Vec(0.f) : Vec::loadu(sb + c + i * kV);
  }
  for (int64_t l = start; l < stop; ++l) {
    const int64_t o = l * C + c;
    for (int i = 0; i < B; ++i) {
      __builtin_prefetch(x + o + i * kV + kTile * C, 0, 3);
      __builtin_prefetch(dy + o + i * kV + kTile * C, 0, 3);
      if (dxw) __builtin_prefetch(dxw + o + i * kV, 1, 3);
      const Vec xc = vload(x + o + i * kV) - mv[i];
      const Vec d = vdz<Act>(vload(dy + o + i * kV), xc, av[i], bv[i]);
      d.store(dz + o + i * kV);
      as[i] = at::vec::fmadd(d, xc, as[i]);
      ab[i] = ab[i] + d;
    }
  }
  for (int i = 0; i < B; ++i) {
    as[i].store(ss + c + i * kV);
    ab[i].store(sb + c + i * kV);
  }
}

// The backward's first pass over positions [start, stop) of one sample:
// dz into dz[l * C + c], the window's sums into ss, sb (overwritten).
template <bool Act, typename T>
void backward_channels(acc_t<T>* dz, const T* dy, const T* x, int64_t start, int64_t stop, int64_t C,
                       const acc_t<T>* m, const acc_t<T>* a, const acc_t<T>* b, acc_t<T>* ss, acc_t<T>* sb,
                       T* dxw) {
  // Channels [0, tail) go in blocks (each block's first tile of the window
  // sets its sums), [tail, C) through the row function, whose sums are
  // zeroed here once per window: one boundary for both.
  int64_t tail = 0;
  if constexpr (kVectorised<T> && kBlockedBackward) {
    tail = C - C % kV;
  }
  std::fill(ss + tail, ss + C, acc_t<T>(0));
  std::fill(sb + tail, sb + C, acc_t<T>(0));
  for (int64_t l0 = start; l0 < stop; l0 += kTile) {
    const int64_t l1 = std::min(stop, l0 + kTile);
    int64_t c = 0;
    if constexpr (kVectorised<T> && kBlockedBackward) {
      for (; c + kBlock * kV <= tail; c += kBlock * kV) {
        backward_channel_block<Act, kBlock>(dz, dy, x, l0, l1, C, c, m, a, b, ss, sb, l0 == start, dxw);
      }
      for (; c < tail; c += kV) {
        backward_channel_block<Act, 1>(dz, dy, x, l0, l1, C, c, m, a, b, ss, sb, l0 == start, dxw);
      }
    }
    for (int64_t l = l0; l < l1 && tail < C; ++l) {
      backward_row_channels<Act>(dz + l * C + tail, dy + l * C + tail, x + l * C + tail, C - tail, m + tail,
                                 a + tail, b + tail, ss + tail, sb + tail);
    }
  }
}

// dx[l, c...] = k dz + c2 (x - m) + c3 for positions [0, L).
template <int B, typename T>
inline __attribute__((always_inline)) void dx_channel_block(T* dx, const float* dz, const T* x, int64_t l0,
                                                            int64_t l1, int64_t C, int64_t c, const float* m,
                                                            const float* k, const float* c2, const float* c3) {
  Vec mv[B], kv[B], c2v[B], c3v[B];
  for (int i = 0; i < B; ++i) {
    mv[i] = Vec::loadu(m + c + i * kV);
    kv[i] = Vec::loadu(k + c + i * kV);
    c2v[i] = Vec::loadu(c2 + c + i * kV);
    c3v[i] = Vec::loadu(c3 + c + i * kV);
  }
  for (int64_t l = l0; l < l1; ++l) {
    const int64_t o = l * C + c;
    for (int i = 0; i < B; ++i) {
      const Vec out = at::vec::fmadd(kv[i], Vec::loadu(dz + o + i * kV),
                                     at::vec::fmadd(c2v[i], vload(x + o + i * kV) - mv[i], c3v[i]));
      vstore(dx + o + i * kV, out);
    }
  }
}

template <typename T>
void dx_channels(T* dx, const acc_t<T>* dz, const T* x, int64_t L, int64_t C, const acc_t<T>* m, const acc_t<T>* k,
                 const acc_t<T>* c2, const acc_t<T>* c3) {
  for (int64_t l0 = 0; l0 < L; l0 += kTile) {
    const int64_t l1 = std::min(L, l0 + kTile);
    int64_t c = 0;
    if constexpr (kVectorised<T> && kBlockedBackward) {
      for (; c + kBlock * kV <= C; c += kBlock * kV) dx_channel_block<kBlock>(dx, dz, x, l0, l1, C, c, m, k, c2, c3);
      for (; c + kV <= C; c += kV) dx_channel_block<1>(dx, dz, x, l0, l1, C, c, m, k, c2, c3);
    }
    if (c < C) {
      for (int64_t l = l0; l < l1; ++l) {
        dx_row<true>(dx + l * C + c, dz + l * C + c, x + l * C + c, C - c, m + c, k + c, c2 + c, c3 + c);
      }
    }
  }
}

// Per-(sample, channel) affine parameters: gamma, beta, and the modulation
// factor k = 1 + scale and offset shift.
template <typename A>
struct Params {
  const A* w;   // [C] or null
  const A* b;   // [C] or null
  const A* sc;  // [N, C] or null
  const A* sh;  // [N, C] or null
  int64_t C;
  A gamma(int64_t c) const { return w ? w[c] : A(1); }
  A beta(int64_t c) const { return b ? b[c] : A(0); }
  A k(int64_t n, int64_t c) const { return sc ? A(1) + sc[n * C + c] : A(1); }
  A shift(int64_t n, int64_t c) const { return sh ? sh[n * C + c] : A(0); }
  // z = (x - mean) * a + b for sample n, channel c with 1/std rstd.
  void fold(int64_t n, int64_t c, A rstd, A& a, A& b_out) const {
    const A kk = k(n, c);
    a = gamma(c) * rstd * kk;
    // One rounding, written out: left to the compiler, whether this product
    // and sum were contracted into an FMA depended on where fold was inlined,
    // and the forward and backward could fold different bits.
    b_out = std::fma(beta(c), kk, shift(n, c));
  }
  // fold for the D channels from c0 (one group), into a[0:D], b[0:D]. With
  // weight and bias and no modulation the fold is a = w rstd, b = bias (the
  // same values as with k = 1 and shift = 0), in a loop without fold's
  // per-channel pointer tests (a few percent of the forward at 4x4).
  void fold_group(int64_t n, int64_t c0, int64_t D, A rstd, A* a, A* b_out) const {
    if (w && b && !sc && !sh) {
      for (int64_t d = 0; d < D; ++d) {
        a[d] = w[c0 + d] * rstd;
        b_out[d] = b[c0 + d];
      }
      return;
    }
    for (int64_t d = 0; d < D; ++d) fold(n, c0 + d, rstd, a[d], b_out[d]);
  }
};


// The statistics of the contiguous groups [first, last) of M elements each:
// block_shifted_moments per group, then mean = k + s1 / M,
// var = (s2 - s1^2 / M) / M and rstd = 1 / sqrt(var + eps) for kD groups at
// a time (float64 vectors: the same operations as one group at a time, the
// same bits). One group's divisions and square root in a row had made a
// chain of a few dozen cycles per group.
template <typename T>
void batch_group_stats(const T* X, int64_t first, int64_t last, int64_t M, double eps, acc_t<T>* MEAN,
                       acc_t<T>* RSTD) {
  using VecD = at::vec::Vectorized<double>;
  constexpr int64_t kD = VecD::size();
  const VecD Mv(static_cast<double>(M)), zero(0.0), eps_v(eps), one(1.0);
  for (int64_t g0 = first; g0 < last; g0 += kD) {
    const int64_t h = std::min<int64_t>(kD, last - g0);
    double s1[kD] = {}, s2[kD] = {}, k[kD] = {}, mean[kD], rstd[kD];
    for (int64_t i = 0; i < h; ++i) {
      block_shifted_moments(X + (g0 + i) * M, M, s1[i], s2[i], k[i]);
    }
    const VecD a = VecD::loadu(s1), q = VecD::loadu(s2);
    // Rounding can leave the variance slightly negative: clamp at 0, but keep
    // a NaN (an inf in x gives inf - inf), as F.group_norm does (max
    // propagates NaN).
    const VecD var = at::vec::maximum((q - a * a / Mv) / Mv, zero);
    (VecD::loadu(k) + a / Mv).store(mean);
    (one / (var + eps_v).sqrt()).store(rstd);
    for (int64_t i = 0; i < h; ++i) {
      MEAN[g0 + i] = static_cast<acc_t<T>>(mean[i]);
      RSTD[g0 + i] = static_cast<acc_t<T>>(rstd[i]);
    }
  }
}

template <typename T>
void forward_impl(const T* X, T* Y, acc_t<T>* MEAN, acc_t<T>* RSTD, const Params<acc_t<T>>& P, const GnShape& s,
                  double eps) {
  using A = acc_t<T>;
  const int64_t N = s.N, C = s.C, G = s.G, D = s.D, L = s.L;
  const double M = static_cast<double>(D * L);
  if (!s.channels_last) {
    // Groups go in batches of about 16 KiB of input (at least one group):
    // first every group's statistics, then every group's output. The
    // statistics end in a chain of dependent divisions and a square root; with
    // small groups (4x4 and 8x8 maps: a few hundred elements) waiting on that
    // chain before each group's output had cost as much as the output itself.
    // Independent chains back to back overlap, and the batch is still in L1
    // for the second pass.
    const int64_t batch = std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, D * L * int64_t(sizeof(T))));
    at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> fa(D), fb(D);
      for (int64_t first = begin; first < end; first += batch) {
        const int64_t last = std::min(end, first + batch);
        batch_group_stats(X, first, last, D * L, eps, MEAN, RSTD);
        // The next batch's input is fetched while this one's output is
        // computed (one prefetch per vector written).
        const int64_t pf = last < end ? (last - first) * D * L : 0;
        for (int64_t ng = first; ng < last; ++ng) {
          const int64_t n = ng / G, g = ng % G;
          const A m = MEAN[ng], rstd = RSTD[ng];
          P.fold_group(n, g * D, D, rstd, fa.data(), fb.data());
          if (s.silu) {
            forward_group<true>(Y + ng * D * L, X + ng * D * L, D, L, m, fa.data(), fb.data(), pf);
          } else {
            forward_group<false>(Y + ng * D * L, X + ng * D * L, D, L, m, fa.data(), fb.data(), pf);
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sums(C), mean(G);
    std::vector<A> scratch(C), center(C), a(C), b(C);
    // The per-channel loops below run group by group (c = g * D + d): a
    // division c / D per channel made them cost more than the data passes at
    // 4x4 and 8x8.
    for (int64_t n = begin; n < end; ++n) {
      const T* xn = X + n * L * C;
      std::fill(sums.begin(), sums.end(), 0.0);
      rows_moment<false>(xn, L, C, static_cast<const A*>(nullptr), sums.data(), scratch.data());
      for (int64_t g = 0; g < G; ++g) {
        double total = 0.0;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) total += sums[c];
        mean[g] = total / M;
        std::fill(center.begin() + g * D, center.begin() + (g + 1) * D, static_cast<A>(mean[g]));
      }
      std::fill(sums.begin(), sums.end(), 0.0);
      rows_moment<true>(xn, L, C, center.data(), sums.data(), scratch.data());
      for (int64_t g = 0; g < G; ++g) {
        double var = 0.0;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) var += sums[c];
        const A rstd = static_cast<A>(1.0 / std::sqrt(var / M + eps));
        MEAN[n * G + g] = static_cast<A>(mean[g]);
        RSTD[n * G + g] = rstd;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          P.fold(n, c, rstd, a[c], b[c]);
          center[c] = MEAN[n * G + g];
        }
      }
      // The next sample's input is fetched while this one's output is
      // computed: the statistics' passes walk it column block by column
      // block, which the hardware prefetcher does not follow.
      const int64_t pf = n + 1 < end ? L * C : 0;
      if (s.silu) {
        forward_channels<true>(Y + n * L * C, xn, L, C, center.data(), a.data(), b.data(), pf);
      } else {
        forward_channels<false>(Y + n * L * C, xn, L, C, center.data(), a.data(), b.data(), pf);
      }
    }
  });
}

// dx plus the per-(sample, channel) sums DS = sum(dz * (x - mean)),
// DB = sum(dz).
template <typename T>
void backward_impl(const T* DY, const T* X, T* DX, const acc_t<T>* MEAN, const acc_t<T>* RSTD,
                   const Params<acc_t<T>>& P, const GnShape& s, double* DS, double* DB) {
  using A = acc_t<T>;
  const int64_t N = s.N, C = s.C, G = s.G, D = s.D, L = s.L;
  const double M = static_cast<double>(D * L);
  // The GroupNorm backward's per-group coefficients, from the channel sums:
  // dx = gamma k rstd dz + c2 (x - mean) + c3, with dh = gamma k dz the
  // gradient reaching xhat:
  //   c2 = -rstd^3 / M * sum(dh (x - mean)),  c3 = -rstd / M * sum(dh).
  auto coefficients = [&](int64_t n, int64_t g, A& c2, A& c3) {
    double sa = 0, sb = 0;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      const double gk = static_cast<double>(P.gamma(c)) * P.k(n, c);
      sa += gk * DS[n * C + c];
      sb += gk * DB[n * C + c];
    }
    const double rstd = RSTD[n * G + g];
    c2 = static_cast<A>(-sa * rstd * rstd * rstd / M);
    c3 = static_cast<A>(-sb * rstd / M);
  };
  if (!s.channels_last) {
    at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> dz(D * L), fa(D), fb(D);
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / G, g = ng % G;
        const A mean = MEAN[ng], rstd = RSTD[ng];
        const T* xg = X + ng * D * L;
        const T* dyg = DY + ng * D * L;
        T* dxw = D * L * int64_t(sizeof(T)) <= kPrefetchOutputBytes ? DX + ng * D * L : nullptr;
        P.fold_group(n, g * D, D, rstd, fa.data(), fb.data());
        if constexpr (kVectorised<T>) {
          if (L <= kFlush) {
            if (s.silu) {
              backward_group_sums<true>(dz.data(), dyg, xg, D, L, mean, fa.data(), fb.data(), DS + ng * D,
                                        DB + ng * D, dxw);
            } else {
              backward_group_sums<false>(dz.data(), dyg, xg, D, L, mean, fa.data(), fb.data(), DS + ng * D,
                                         DB + ng * D, dxw);
            }
          }
        }
        if (!kVectorised<T> || L > kFlush) {
          for (int64_t d = 0; d < D; ++d) {
            double ds = 0, db = 0;
            if (s.silu) {
              backward_row_scalar<true>(dz.data() + d * L, dyg + d * L, xg + d * L, L, mean, fa[d], fb[d], ds, db,
                                        dxw ? dxw + d * L : nullptr);
            } else {
              backward_row_scalar<false>(dz.data() + d * L, dyg + d * L, xg + d * L, L, mean, fa[d], fb[d], ds,
                                         db, dxw ? dxw + d * L : nullptr);
            }
            DS[ng * D + d] = ds;
            DB[ng * D + d] = db;
          }
        }
        A c2, c3;
        coefficients(n, g, c2, c3);
        for (int64_t d = 0; d < D; ++d) {
          const int64_t c = g * D + d;
          const A k = P.gamma(c) * P.k(n, c) * rstd;
          dx_row<false>(DX + (n * C + c) * L, dz.data() + d * L, xg + d * L, L, &mean, &k, &c2, &c3);
        }
      }
    });
    return;
  }
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> dz(L * C), m(C), a(C), b(C), ss(C), sb(C), k(C), c2v(C), c3v(C);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const A rstd = RSTD[n * G + g], mean = MEAN[n * G + g];
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          P.fold(n, c, rstd, a[c], b[c]);
          m[c] = mean;
        }
      }
      std::fill(DS + n * C, DS + (n + 1) * C, 0.0);
      std::fill(DB + n * C, DB + (n + 1) * C, 0.0);
      const T* xn = X + n * L * C;
      const T* dyn = DY + n * L * C;
      // As in the contiguous layout: the first pass fetches the next tile's
      // x and dy (the hardware prefetcher does not follow its column-block
      // walk) and the lines of dx (samples up to kPrefetchOutputBytes).
      T* dxw = L * C * int64_t(sizeof(T)) <= kPrefetchOutputBytes ? DX + n * L * C : nullptr;
      for (int64_t start = 0; start < L; start += kFlushPositions) {
        const int64_t stop = std::min(L, start + kFlushPositions);
        if (s.silu) {
          backward_channels<true>(dz.data(), dyn, xn, start, stop, C, m.data(), a.data(), b.data(), ss.data(),
                                  sb.data(), dxw);
        } else {
          backward_channels<false>(dz.data(), dyn, xn, start, stop, C, m.data(), a.data(), b.data(), ss.data(),
                                   sb.data(), dxw);
        }
        for (int64_t c = 0; c < C; ++c) {
          DS[n * C + c] += ss[c];
          DB[n * C + c] += sb[c];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        A c2, c3;
        coefficients(n, g, c2, c3);
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          k[c] = P.gamma(c) * P.k(n, c) * RSTD[n * G + g];
          c2v[c] = c2;
          c3v[c] = c3;
        }
      }
      dx_channels(DX + n * L * C, dz.data(), xn, L, C, m.data(), k.data(), c2v.data(), c3v.data());
    }
  });
}

}  // namespace

int vector_width() {
  return static_cast<int>(kV);
}

template <typename T>
static void forward_typed(const void* x, void* y, void* mean, void* rstd, const void* w, const void* b,
                          const void* sc, const void* sh, const GnShape& s, double eps) {
  using A = acc_t<T>;
  Params<A> P{static_cast<const A*>(w), static_cast<const A*>(b), static_cast<const A*>(sc),
              static_cast<const A*>(sh), s.C};
  forward_impl<T>(static_cast<const T*>(x), static_cast<T*>(y), static_cast<A*>(mean), static_cast<A*>(rstd), P, s,
                  eps);
}

template <typename T>
static void backward_typed(const void* dy, const void* x, void* dx, const void* mean, const void* rstd,
                           const void* w, const void* b, const void* sc, const void* sh, const GnShape& s, double* ds,
                           double* db) {
  using A = acc_t<T>;
  Params<A> P{static_cast<const A*>(w), static_cast<const A*>(b), static_cast<const A*>(sc),
              static_cast<const A*>(sh), s.C};
  backward_impl<T>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx),
                   static_cast<const A*>(mean), static_cast<const A*>(rstd), P, s, ds, db);
}

void forward(ElementType type, const void* x, void* y, void* mean, void* rstd, const void* w, const void* b,
             const void* sc, const void* sh, const GnShape& s, double eps) {
  switch (type) {
    case ElementType::Float: return forward_typed<float>(x, y, mean, rstd, w, b, sc, sh, s, eps);
    case ElementType::Double: return forward_typed<double>(x, y, mean, rstd, w, b, sc, sh, s, eps);
    case ElementType::Half: return forward_typed<c10::Half>(x, y, mean, rstd, w, b, sc, sh, s, eps);
    case ElementType::BFloat16: return forward_typed<c10::BFloat16>(x, y, mean, rstd, w, b, sc, sh, s, eps);
  }
}

void backward(ElementType type, const void* dy, const void* x, void* dx, const void* mean, const void* rstd,
              const void* w, const void* b, const void* sc, const void* sh, const GnShape& s, double* ds, double* db) {
  switch (type) {
    case ElementType::Float: return backward_typed<float>(dy, x, dx, mean, rstd, w, b, sc, sh, s, ds, db);
    case ElementType::Double: return backward_typed<double>(dy, x, dx, mean, rstd, w, b, sc, sh, s, ds, db);
    case ElementType::Half: return backward_typed<c10::Half>(dy, x, dx, mean, rstd, w, b, sc, sh, s, ds, db);
    case ElementType::BFloat16: return backward_typed<c10::BFloat16>(dy, x, dx, mean, rstd, w, b, sc, sh, s, ds, db);
  }
}

}  // namespace IDDPM_GN_NS
}  // namespace iddpm_fast
