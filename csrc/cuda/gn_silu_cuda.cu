// CUDA implementation of the fused GroupNorm(-scale-shift)-SiLU ops declared
// in ops.cpp (the CPU twin, with the math written out, is cpu/gn_silu_kernel.h).
//
// Plan, forward: partial Welford statistics per (sample, channel, slice of
// positions); a small kernel merges them per (sample, group) (Chan's
// parallel merge, in float64) and folds mean, 1/std and the affine / scale /
// shift parameters into m, a, b per (sample, channel); one elementwise pass
// writes y = SiLU((x - m) a + b). Backward: the same plan with the sums of
// dz (x - mean) and dz (dz = dy * SiLU'(z)) in place of the statistics, then
// dx = a dz + c2 (x - mean) + c3 elementwise. x is centred before scaling:
// folding the mean into b would cost precision when |mean| * rstd is large.
//
// Two sets of kernels implement it:
//  - the vectorised kernels (the "vectorised kernels" section; taken when
//    the tensor has fewer than 2^31 elements, its pointers are 16-byte
//    aligned and a 16-byte vector never straddles a row: C % V == 0 in
//    channels-last, L % V == 0 in contiguous layout): 16-byte loads, 32-bit
//    index arithmetic with precomputed divisors, statistics merged a chunk
//    at a time, one warp per row for contiguous rows of up to 256 vectors,
//    channels-last blocks of (channel vectors x position lanes) with enough
//    slices along the positions to fill the GPU;
//  - the per-element kernels (every other case): contiguous [N, C, L] on a
//    grid (N*C, S) of 256 threads along the positions; channels-last
//    [N, L, C] on a grid (N, ceil(C/32), S) of 32 channels x 8 positions.
//
// All math in float32 (float64 for float64 inputs); x/y in any of
// fp32/fp64/fp16/bf16. With silu false (GnShape::silu) the kernels leave out
// the SiLU and its derivative: a plain GroupNorm, the attention blocks' norm.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../gn_silu.h"
#include "gn_onepass.h"
#include "gn_onepass_args.h"
#include "vec_util.h"

namespace iddpm_fast {
namespace {

// Positions per slice: at least this many, more when a channel has so many
// positions that the slices would not fit a grid dimension (65535).
constexpr int64_t kPositionsPerSlice = 2048;
constexpr int64_t kMaxSlices = 65535;
constexpr int kRowThreads = 256;  // contiguous layout: threads per block
constexpr int kTileC = 32;        // channels-last: channels per block
constexpr int kTileL = 8;         // channels-last: position lanes per block

__device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) {
  return a < b ? a : b;
}

template <typename A>
__device__ __forceinline__ A sigmoid_(A z) {
  return A(1) / (A(1) + exp(-z));
}
template <>
__device__ __forceinline__ float sigmoid_<float>(float z) {
  return 1.f / (1.f + __expf(-z));
}

template <typename A>
struct Welford {
  A mean, m2, n;
};

template <typename A>
__device__ __forceinline__ Welford<A> merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.n == A(0)) return a;
  if (a.n == A(0)) return b;
  const A n = a.n + b.n;
  const A delta = b.mean - a.mean;
  const A wb = b.n / n;
  return {a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb, n};
}

template <typename A>
__device__ __forceinline__ Welford<A> push(Welford<A> w, A x) {
  w.n += A(1);
  const A delta = x - w.mean;
  w.mean += delta / w.n;
  w.m2 += delta * (x - w.mean);
  return w;
}

// The sums the backward reduces: sum(dz * (x - mean)) and sum(dz).
template <typename A>
struct GradSums {
  A ds, db;
};

template <typename A>
__device__ __forceinline__ GradSums<A> merge(const GradSums<A>& a, const GradSums<A>& b) {
  return {a.ds + b.ds, a.db + b.db};
}

// dz = dy * SiLU'(z), z = (x - mean) a + b.
template <typename A>
__device__ __forceinline__ A silu_grad(A dy, A z) {
  const A s = sigmoid_(z);
  return dy * s * (A(1) + z * (A(1) - s));
}

// The activation after the norm and its gradient: SiLU when act, else the
// identity (plain GroupNorm, the attention blocks').
template <typename A>
__device__ __forceinline__ A activate(A z, bool act) {
  return act ? z * sigmoid_(z) : z;
}
template <typename A>
__device__ __forceinline__ A activate_grad(A dy, A z, bool act) {
  return act ? silu_grad(dy, z) : dy;
}

// Tree reduction of one value per thread over a 1-D block of kRowThreads
// threads; every thread gets the total.
template <typename V>
__device__ __forceinline__ V reduce_rows(V v) {
  __shared__ V shared[kRowThreads];
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] = merge(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  return shared[0];
}

// Reduction over threadIdx.y of a (kTileC, kTileL) block; the totals are in
// the threads of row y == 0 (one per channel).
template <typename V>
__device__ __forceinline__ V reduce_tile(V v) {
  __shared__ V shared[kTileL][kTileC];
  shared[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int k = 1; k < kTileL; ++k) v = merge(v, shared[k][threadIdx.x]);
  }
  return v;
}

// ---------------------------------------------------------------- partials

// Welford statistics of (n, c, slice) for contiguous x; grid (N*C, S).
template <typename T, typename A>
__global__ void stats_partial_rows(const T* __restrict__ x, int64_t L, int64_t S, int64_t slice,
                                   Welford<A>* __restrict__ out) {
  const int64_t nc = blockIdx.x, s = blockIdx.y;
  const int64_t l0 = s * slice, l1 = lmin(L, l0 + slice);
  const T* row = x + nc * L;
  Welford<A> w{A(0), A(0), A(0)};
  for (int64_t l = l0 + threadIdx.x; l < l1; l += blockDim.x) w = push(w, static_cast<A>(row[l]));
  const Welford<A> total = reduce_rows(w);
  if (threadIdx.x == 0) out[nc * S + s] = total;
}

// The same for channels-last x; grid (N, ceil(C/32), S), block (32, 8).
template <typename T, typename A>
__global__ void stats_partial_tiles(const T* __restrict__ x, int64_t L, int64_t C, int64_t S, int64_t slice,
                                    Welford<A>* __restrict__ out) {
  const int64_t n = blockIdx.x, c = blockIdx.y * kTileC + threadIdx.x, s = blockIdx.z;
  const int64_t l0 = s * slice, l1 = lmin(L, l0 + slice);
  Welford<A> w{A(0), A(0), A(0)};
  if (c < C) {
    for (int64_t l = l0 + threadIdx.y; l < l1; l += kTileL) w = push(w, static_cast<A>(x[(n * L + l) * C + c]));
  }
  w = reduce_tile(w);
  if (threadIdx.y == 0 && c < C) out[(n * C + c) * S + s] = w;
}

// sum(dz * (x - mean)), sum(dz) of (n, c, slice), contiguous; grid (N*C, S).
template <typename T, typename A>
__global__ void grad_partial_rows(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ mean,
                                  const A* __restrict__ a, const A* __restrict__ b, int64_t L, int64_t D, int64_t S,
                                  int64_t slice, GradSums<A>* __restrict__ out, bool act) {
  const int64_t nc = blockIdx.x, s = blockIdx.y;
  const int64_t l0 = s * slice, l1 = lmin(L, l0 + slice);
  const A m = mean[nc / D], an = a[nc], bn = b[nc];  // nc / D = n * G + c / D
  GradSums<A> g{A(0), A(0)};
  for (int64_t l = l0 + threadIdx.x; l < l1; l += blockDim.x) {
    const A xc = static_cast<A>(x[nc * L + l]) - m;
    const A d = activate_grad(static_cast<A>(dy[nc * L + l]), xc * an + bn, act);
    g.ds += d * xc;
    g.db += d;
  }
  const GradSums<A> total = reduce_rows(g);
  if (threadIdx.x == 0) out[nc * S + s] = total;
}

// The same for channels-last; grid (N, ceil(C/32), S), block (32, 8).
template <typename T, typename A>
__global__ void grad_partial_tiles(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ mean,
                                   const A* __restrict__ a, const A* __restrict__ b, int64_t L, int64_t C, int64_t D,
                                   int64_t S, int64_t slice, GradSums<A>* __restrict__ out, bool act) {
  const int64_t n = blockIdx.x, c = blockIdx.y * kTileC + threadIdx.x, s = blockIdx.z;
  const int64_t l0 = s * slice, l1 = lmin(L, l0 + slice);
  GradSums<A> g{A(0), A(0)};
  if (c < C) {
    const A m = mean[(n * C + c) / D], an = a[n * C + c], bn = b[n * C + c];
    for (int64_t l = l0 + threadIdx.y; l < l1; l += kTileL) {
      const int64_t i = (n * L + l) * C + c;
      const A xc = static_cast<A>(x[i]) - m;
      const A d = activate_grad(static_cast<A>(dy[i]), xc * an + bn, act);
      g.ds += d * xc;
      g.db += d;
    }
  }
  g = reduce_tile(g);
  if (threadIdx.y == 0 && c < C) out[(n * C + c) * S + s] = g;
}

// ------------------------------------------------------------ small kernels

// Per (n, g): merge the D * S partials (float64) into mean and 1/std.
template <typename A>
__global__ void stats_finalize(const Welford<A>* __restrict__ partial, int64_t N, int64_t G, int64_t D, int64_t S,
                               double eps, A* __restrict__ mean, A* __restrict__ rstd) {
  const int64_t ng = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (ng >= N * G) return;
  Welford<double> w{0.0, 0.0, 0.0};
  const Welford<A>* p = partial + ng * D * S;  // channels g*D .. g*D+D-1 of sample n are consecutive
  for (int64_t i = 0; i < D * S; ++i) {
    w = merge(w, Welford<double>{static_cast<double>(p[i].mean), static_cast<double>(p[i].m2),
                                 static_cast<double>(p[i].n)});
  }
  const double var = w.n > 0 ? w.m2 / w.n : 0.0;
  mean[ng] = static_cast<A>(w.mean);
  rstd[ng] = static_cast<A>(rsqrt(var + eps));
}

// Per (n, c): z = (x - mean) a + b; a = w (1 + scale) rstd is also the
// backward's dx coefficient. (x is centred before scaling: folding the mean
// into b would cost precision when |mean| * rstd is large.)
template <typename A>
__global__ void fold_coefficients(const A* __restrict__ rstd, const A* __restrict__ w, const A* __restrict__ bias,
                                  const A* __restrict__ scale, const A* __restrict__ shift, int64_t N, int64_t C,
                                  int64_t D, A* __restrict__ a, A* __restrict__ b) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * C) return;
  const int64_t c = i % C;
  const A gamma = w ? w[c] : A(1), beta = bias ? bias[c] : A(0);
  const A mod = scale ? A(1) + scale[i] : A(1), off = shift ? shift[i] : A(0);
  a[i] = gamma * rstd[i / D] * mod;  // i / D = n * G + c / D
  b[i] = beta * mod + off;
}

// Per (n, c): total the slices; d scale, d shift.
template <typename A>
__global__ void grad_finalize_channels(const GradSums<A>* __restrict__ partial, const A* __restrict__ mean,
                                       const A* __restrict__ rstd, const A* __restrict__ w, const A* __restrict__ bias,
                                       int64_t N, int64_t C, int64_t D, int64_t S, bool has_scale,
                                       double* __restrict__ ds, double* __restrict__ db, double* __restrict__ dscale,
                                       double* __restrict__ dshift) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * C) return;
  double s1 = 0, s2 = 0;
  for (int64_t s = 0; s < S; ++s) {
    s1 += static_cast<double>(partial[i * S + s].ds);
    s2 += static_cast<double>(partial[i * S + s].db);
  }
  ds[i] = s1;
  db[i] = s2;
  if (has_scale) {
    const int64_t n = i / C, c = i % C, ng = n * (C / D) + c / D;
    const double gamma = w ? static_cast<double>(w[c]) : 1.0, beta = bias ? static_cast<double>(bias[c]) : 0.0;
    const double dz_xhat = static_cast<double>(rstd[ng]) * s1;
    dscale[i] = gamma * dz_xhat + beta * s2;
    dshift[i] = s2;
  }
}

// Per (n, g): the GroupNorm backward's c2, c3 (M elements per group).
template <typename A>
__global__ void grad_group_coefficients(const double* __restrict__ ds, const double* __restrict__ db,
                                          const A* __restrict__ mean, const A* __restrict__ rstd,
                                          const A* __restrict__ w, const A* __restrict__ scale, int64_t N, int64_t C,
                                          int64_t D, double M, A* __restrict__ c2, A* __restrict__ c3) {
  const int64_t G = C / D;
  const int64_t ng = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (ng >= N * G) return;
  const int64_t n = ng / G, g = ng % G;
  double sa = 0, sb = 0;
  for (int64_t c = g * D; c < (g + 1) * D; ++c) {
    const double gk =
        (w ? static_cast<double>(w[c]) : 1.0) * (scale ? 1.0 + static_cast<double>(scale[n * C + c]) : 1.0);
    sa += gk * ds[n * C + c];
    sb += gk * db[n * C + c];
  }
  const double r = rstd[ng];
  c2[ng] = static_cast<A>(-sa * r * r * r / M);
  c3[ng] = static_cast<A>(-sb * r / M);
}

// Per c: d weight = sum_n (1 + scale) rstd DS, d bias = sum_n (1 + scale) DB
// (DS is already centred: sum(dz * (x - mean))), summed in float64 and
// written as O (float64, or the gradients' own float32: see param_grad_buffer_dtype).
template <typename A, typename O>
__global__ void grad_params(const double* __restrict__ ds, const double* __restrict__ db, const A* __restrict__ mean,
                            const A* __restrict__ rstd, const A* __restrict__ scale, int64_t N, int64_t C, int64_t D,
                            O* __restrict__ dw, O* __restrict__ dbias) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const int64_t G = C / D;
  double sw = 0, sb = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t i = n * C + c, ng = n * G + c / D;
    const double k = scale ? 1.0 + static_cast<double>(scale[i]) : 1.0;
    sw += k * static_cast<double>(rstd[ng]) * ds[i];
    sb += k * db[i];
  }
  dw[c] = static_cast<O>(sw);
  dbias[c] = static_cast<O>(sb);
}

// ------------------------------------------------------------ elementwise

template <typename T, typename A, bool ChannelsLast>
__global__ void apply_forward(const T* __restrict__ x, T* __restrict__ y, const A* __restrict__ mean,
                              const A* __restrict__ a, const A* __restrict__ b, int64_t numel, int64_t C, int64_t D,
                              int64_t L, bool act) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t nc = ChannelsLast ? (i / (L * C)) * C + i % C : i / L;
    const A z = (static_cast<A>(x[i]) - mean[nc / D]) * a[nc] + b[nc];
    y[i] = static_cast<T>(activate(z, act));
  }
}

template <typename T, typename A, bool ChannelsLast>
__global__ void apply_backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                               const A* __restrict__ mean, const A* __restrict__ a, const A* __restrict__ b,
                               const A* __restrict__ c2, const A* __restrict__ c3, int64_t numel, int64_t C,
                               int64_t D, int64_t L, bool act) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t n = i / (L * C);
    const int64_t c = ChannelsLast ? i % C : (i / L) % C;
    const int64_t nc = n * C + c, ng = n * (C / D) + c / D;
    const A xc = static_cast<A>(x[i]) - mean[ng];
    const A d = activate_grad(static_cast<A>(dy[i]), xc * a[nc] + b[nc], act);
    dx[i] = static_cast<T>(a[nc] * d + c2[ng] * xc + c3[ng]);
  }
}

// ------------------------------------------------------- vectorised kernels
//
// The fast path, taken when the tensor has fewer than 2^31 elements, the
// vectors below do not straddle a row (contiguous: L % V == 0; channels-last:
// C % V == 0) and the pointers are 16-byte aligned; the kernels above serve
// every other case. Each thread moves 16 bytes per load (V elements), index
// arithmetic is 32-bit with precomputed divisors (a 64-bit division per
// element had made the elementwise passes compute-bound), and the statistics
// merge whole chunks of values into the running Welford state (Chan's
// formula, one reciprocal per chunk) instead of dividing per element.

using at::cuda::detail::IntDivider;
using cuda_vec::Vec;
using cuda_vec::vec_width;

constexpr int kUnroll = 4;  // channels-last: positions each thread loads per iteration

// Merges a chunk of k values with mean cmean and centred square sum cm2 into
// w; r = k / (w.n + k), shared by every channel a thread accumulates.
template <typename A>
__device__ __forceinline__ void merge_chunk(Welford<A>& w, A cmean, A cm2, A k, A r) {
  const A delta = cmean - w.mean;
  w.mean += delta * r;
  w.m2 += cm2 + delta * delta * w.n * r;
  w.n += k;
}

// Merges the V values of one vector (a chunk), less the shift k, into w.
//
// The vectorised statistics kernels accumulate x - k, k being one value of
// the row or channel (the first of the slice), and add k back once to the
// merged total. Far from zero mean (|mean| / std ~ 1e4) every merge of
// states whose mean is near |mean| rounds it to float32's spacing there,
// a sizeable fraction of std, and a chunk's sum of raw values loses digits
// the same way; about k the values are small and the merges exact enough.
// k is a sample of the data, so the shift costs nothing in the usual case.
template <typename T, typename A, int V>
__device__ __forceinline__ void merge_vector(Welford<A>& w, const Vec<T, V>& xv, A k) {
  A sum = A(0);
#pragma unroll
  for (int v = 0; v < V; ++v) sum += static_cast<A>(xv.v[v]) - k;
  const A cmean = sum * (A(1) / A(V));
  A cm2 = A(0);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const A d = (static_cast<A>(xv.v[v]) - k) - cmean;
    cm2 += d * d;
  }
  merge_chunk(w, cmean, cm2, A(V), A(V) / (w.n + A(V)));
}

// Adds one vector of a row's dz * (x - mean) and dz to g (m, a, b of the row).
template <typename T, typename A, int V>
__device__ __forceinline__ void accumulate_vector(GradSums<A>& g, const Vec<T, V>& xv, const Vec<T, V>& gv, A mn,
                                                  A an, A bn, bool act) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const A xc = static_cast<A>(xv.v[v]) - mn;
    const A d = activate_grad(static_cast<A>(gv.v[v]), xc * an + bn, act);
    g.ds += d * xc;
    g.db += d;
  }
}

// The channels-last kernels' last step: each thread (tx, ty) of the (TX, TY)
// block has stored its V channels' results at shared[(ty * TX + tx) * V + v];
// thread t < TX * V merges the TY lanes of output (channel vector t % TX,
// element t / TX) and writes finish(total, c) to out[(n * C + c) * S + s].
template <typename R>
struct Unchanged {
  __device__ R operator()(const R& r, int64_t) const { return r; }
};

// Adds back the shift of the channels-last statistics (see merge_vector):
// channel c's value in row; an empty slice (n == 0) has none and reads none.
template <typename T, typename A>
struct AddShift {
  const T* row;
  __device__ Welford<A> operator()(const Welford<A>& w, int64_t c) const {
    return w.n > A(0) ? Welford<A>{w.mean + static_cast<A>(row[c]), w.m2, w.n} : w;
  }
};

template <int V, typename R, typename Finish = Unchanged<R>>
__device__ __forceinline__ void write_lane_totals(const R* shared, int64_t n, int64_t C, int64_t S, int64_t s,
                                                  R* __restrict__ out, Finish finish = Finish()) {
  const int TX = blockDim.x, TY = blockDim.y;
  const int t = threadIdx.y * TX + threadIdx.x;
  if (t >= TX * V) return;
  const int ox = t % TX, ov = t / TX;
  const int64_t c = (int64_t(blockIdx.y) * TX + ox) * V + ov;
  if (c >= C) return;
  R total = shared[ox * V + ov];
  for (int y = 1; y < TY; ++y) total = merge(total, shared[(y * TX + ox) * V + ov]);
  out[(n * C + c) * S + s] = finish(total, c);
}

// Welford statistics of (n, c, slice), contiguous x, V positions per load;
// grid (N*C, S), blockDim.x a power of two <= kRowThreads, slice % V == 0.
template <typename T, typename A, int V>
__global__ void stats_partial_rows_vec(const T* __restrict__ x, int64_t L, int64_t S, int64_t slice,
                                       Welford<A>* __restrict__ out) {
  const int64_t nc = blockIdx.x, s = blockIdx.y;
  const int64_t l0 = s * slice, l1 = lmin(L, l0 + slice);
  const T* row = x + nc * L;
  const A k = l0 < l1 ? static_cast<A>(row[l0]) : A(0);  // the shift (see merge_vector)
  Welford<A> w{A(0), A(0), A(0)};
  for (int64_t l = l0 + int64_t(threadIdx.x) * V; l < l1; l += int64_t(blockDim.x) * V) {
    merge_vector(w, *reinterpret_cast<const Vec<T, V>*>(row + l), k);
  }
  const Welford<A> total = reduce_rows(w);
  if (threadIdx.x == 0) out[nc * S + s] = Welford<A>{total.mean + k, total.m2, total.n};
}

// Short contiguous rows (the 8x8 and 16x16 stages of a UNet in NCHW): one
// warp per row, eight rows per block, totals by warp shuffles. One block per
// row would leave most of its threads idle and synchronise for a handful of
// loads. grid ceil(N*C / 8), block (32, 8); S == 1.
template <typename A>
__device__ __forceinline__ Welford<A> shfl_xor(const Welford<A>& w, int mask) {
  return {__shfl_xor_sync(0xffffffffu, w.mean, mask), __shfl_xor_sync(0xffffffffu, w.m2, mask),
          __shfl_xor_sync(0xffffffffu, w.n, mask)};
}

template <typename A>
__device__ __forceinline__ GradSums<A> shfl_xor(const GradSums<A>& g, int mask) {
  return {__shfl_xor_sync(0xffffffffu, g.ds, mask), __shfl_xor_sync(0xffffffffu, g.db, mask)};
}

template <typename R>
__device__ __forceinline__ R warp_allreduce(R r) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) r = merge(r, shfl_xor(r, mask));
  return r;
}

constexpr int kWarpRows = 8;  // rows (warps) per block in the warp-per-row kernels

template <typename T, typename A, int V>
__global__ void stats_partial_rows_warp(const T* __restrict__ x, int64_t rows, int64_t L,
                                        Welford<A>* __restrict__ out) {
  const int64_t nc = int64_t(blockIdx.x) * kWarpRows + threadIdx.y;
  if (nc >= rows) return;  // the whole warp leaves together
  const T* row = x + nc * L;
  const A k = L > 0 ? static_cast<A>(row[0]) : A(0);  // the shift (see merge_vector)
  Welford<A> w{A(0), A(0), A(0)};
  for (int64_t l = int64_t(threadIdx.x) * V; l < L; l += 32 * V) {
    merge_vector(w, *reinterpret_cast<const Vec<T, V>*>(row + l), k);
  }
  w = warp_allreduce(w);
  if (threadIdx.x == 0) out[nc] = Welford<A>{w.mean + k, w.m2, w.n};
}

template <typename T, typename A, int V>
__global__ void grad_partial_rows_warp(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ m,
                                       const A* __restrict__ a, const A* __restrict__ b, int64_t rows, int64_t L,
                                       GradSums<A>* __restrict__ out, bool act) {
  const int64_t nc = int64_t(blockIdx.x) * kWarpRows + threadIdx.y;
  if (nc >= rows) return;
  const A mn = m[nc], an = a[nc], bn = b[nc];
  GradSums<A> g{A(0), A(0)};
  for (int64_t l = int64_t(threadIdx.x) * V; l < L; l += 32 * V) {
    accumulate_vector(g, *reinterpret_cast<const Vec<T, V>*>(x + nc * L + l),
                      *reinterpret_cast<const Vec<T, V>*>(dy + nc * L + l), mn, an, bn, act);
  }
  g = warp_allreduce(g);
  if (threadIdx.x == 0) out[nc] = g;
}

// Channels-last x [N, L, C]: thread (tx, ty) of a (TX, TY) block (TX * TY <=
// kRowThreads) owns channels (blockIdx.y * TX + tx) * V .. + V - 1 and the
// positions ty, ty + TY, ... of slice blockIdx.z, kUnroll of them per
// iteration; grid (N, ceil(C / V / TX), S).
template <typename T, typename A, int V>
__global__ void stats_partial_cl_vec(const T* __restrict__ x, int64_t L, int64_t C, int64_t S, int64_t slice,
                                     Welford<A>* __restrict__ out) {
  __shared__ Welford<A> shared[kRowThreads * V];
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int64_t n = blockIdx.x, cv = int64_t(blockIdx.y) * TX + tx, s = blockIdx.z;
  const int64_t l0 = s * slice, l1 = lmin(L, l0 + slice);
  const bool active = cv * V < C;
  A mean[V], m2[V], k[V];  // k: each channel's shift, its value at l0 (see merge_vector)
#pragma unroll
  for (int v = 0; v < V; ++v) mean[v] = m2[v] = k[v] = A(0);
  A count = A(0);
  const T* shift_row = x + (n * L + l0) * C;  // read only when l0 < l1
  if (active && l0 < l1) {
    const T* base = x + n * L * C + cv * V;
    const Vec<T, V> kv = *reinterpret_cast<const Vec<T, V>*>(shift_row + cv * V);
#pragma unroll
    for (int v = 0; v < V; ++v) k[v] = static_cast<A>(kv.v[v]);
    for (int64_t l = l0 + ty; l < l1; l += int64_t(kUnroll) * TY) {
      Vec<T, V> xv[kUnroll];
      int nk = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t lu = l + int64_t(u) * TY;
        if (lu < l1) {
          xv[u] = *reinterpret_cast<const Vec<T, V>*>(base + lu * C);
          nk = u + 1;
        }
      }
      const A kk = A(nk), inv_k = A(1) / kk, r = kk / (count + kk);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        A sum = A(0);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) sum += u < nk ? static_cast<A>(xv[u].v[v]) - k[v] : A(0);
        const A cmean = sum * inv_k;
        A cm2 = A(0);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const A d = u < nk ? (static_cast<A>(xv[u].v[v]) - k[v]) - cmean : A(0);
          cm2 += d * d;
        }
        const A delta = cmean - mean[v];
        mean[v] += delta * r;
        m2[v] += cm2 + delta * delta * count * r;
      }
      count += kk;
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) shared[(ty * TX + tx) * V + v] = Welford<A>{mean[v], m2[v], count};
  __syncthreads();
  // Every lane of a channel used the same shift; it is added back once.
  write_lane_totals<V>(shared, n, C, S, s, out, AddShift<T, A>{shift_row});
}

// sum(dz * (x - mean)), sum(dz) of (n, c, slice), contiguous, V positions per
// load; grid (N*C, S); m, a, b are per (n, c).
template <typename T, typename A, int V>
__global__ void grad_partial_rows_vec(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ m,
                                      const A* __restrict__ a, const A* __restrict__ b, int64_t L, int64_t S,
                                      int64_t slice, GradSums<A>* __restrict__ out, bool act) {
  const int64_t nc = blockIdx.x, s = blockIdx.y;
  const int64_t l0 = s * slice, l1 = lmin(L, l0 + slice);
  const A mn = m[nc], an = a[nc], bn = b[nc];
  GradSums<A> g{A(0), A(0)};
  for (int64_t l = l0 + int64_t(threadIdx.x) * V; l < l1; l += int64_t(blockDim.x) * V) {
    accumulate_vector(g, *reinterpret_cast<const Vec<T, V>*>(x + nc * L + l),
                      *reinterpret_cast<const Vec<T, V>*>(dy + nc * L + l), mn, an, bn, act);
  }
  const GradSums<A> total = reduce_rows(g);
  if (threadIdx.x == 0) out[nc * S + s] = total;
}

// The same for channels-last, laid out like stats_partial_cl_vec.
template <typename T, typename A, int V>
__global__ void __launch_bounds__(kRowThreads, 2) grad_partial_cl_vec(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ m,
                                    const A* __restrict__ a, const A* __restrict__ b, int64_t L, int64_t C, int64_t S,
                                    int64_t slice, GradSums<A>* __restrict__ out, bool act) {
  __shared__ GradSums<A> shared[kRowThreads * V];
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int64_t n = blockIdx.x, cv = int64_t(blockIdx.y) * TX + tx, s = blockIdx.z;
  const int64_t l0 = s * slice, l1 = lmin(L, l0 + slice);
  const bool active = cv * V < C;
  A ds[V], db[V], mv[V], av[V], bv[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    ds[v] = db[v] = A(0);
    mv[v] = active ? m[n * C + cv * V + v] : A(0);
    av[v] = active ? a[n * C + cv * V + v] : A(0);
    bv[v] = active ? b[n * C + cv * V + v] : A(0);
  }
  if (active) {
    const int64_t base = n * L * C + cv * V;
    for (int64_t l = l0 + ty; l < l1; l += int64_t(kUnroll) * TY) {
      Vec<T, V> xv[kUnroll], gv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t lu = l + int64_t(u) * TY;
        if (lu < l1) {
          xv[u] = *reinterpret_cast<const Vec<T, V>*>(x + base + lu * C);
          gv[u] = *reinterpret_cast<const Vec<T, V>*>(dy + base + lu * C);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (l + int64_t(u) * TY < l1) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const A xc = static_cast<A>(xv[u].v[v]) - mv[v];
            const A d = activate_grad(static_cast<A>(gv[u].v[v]), xc * av[v] + bv[v], act);
            ds[v] += d * xc;
            db[v] += d;
          }
        }
      }
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) shared[(ty * TX + tx) * V + v] = GradSums<A>{ds[v], db[v]};
  __syncthreads();
  write_lane_totals<V>(shared, n, C, S, s, out);
}

// Per (n, g), one warp each (kWarpRows groups per block): the lanes merge
// the group's D * S partials in float64 (a channels-last 256x256 image at
// batch 1 has thousands, too many for one thread), and lane 0's total is the
// result; then mean and 1/std, and the affine / scale / shift parameters
// folded into m (the mean), a, b per (n, c) of the group.
template <typename A>
__global__ void stats_finalize_fold(const Welford<A>* __restrict__ partial, const A* __restrict__ w,
                                    const A* __restrict__ bias, const A* __restrict__ scale,
                                    const A* __restrict__ shift, int64_t N, int64_t G, int64_t D, int64_t S,
                                    double eps, A* __restrict__ mean, A* __restrict__ rstd, A* __restrict__ m,
                                    A* __restrict__ a, A* __restrict__ b) {
  const int64_t ng = int64_t(blockIdx.x) * kWarpRows + threadIdx.y;
  if (ng >= N * G) return;  // the whole warp leaves together
  const int lane = threadIdx.x;
  Welford<double> acc{0.0, 0.0, 0.0};
  const Welford<A>* p = partial + ng * D * S;
  for (int64_t i = lane; i < D * S; i += 32) {
    acc = merge(acc, Welford<double>{static_cast<double>(p[i].mean), static_cast<double>(p[i].m2),
                                     static_cast<double>(p[i].n)});
  }
  acc = warp_allreduce(acc);
  // Chan's merge is not symmetric in its arguments: the lanes' totals may
  // differ in the last bit, so every lane takes lane 0's.
  const double total_mean = __shfl_sync(0xffffffffu, acc.mean, 0);
  const double total_m2 = __shfl_sync(0xffffffffu, acc.m2, 0);
  const double total_n = __shfl_sync(0xffffffffu, acc.n, 0);
  const double var = total_n > 0 ? total_m2 / total_n : 0.0;
  const A mu = static_cast<A>(total_mean), r = static_cast<A>(rsqrt(var + eps));
  if (lane == 0) {
    mean[ng] = mu;
    rstd[ng] = r;
  }
  const int64_t C = G * D, n = ng / G, c0 = (ng % G) * D;
  for (int64_t c = c0 + lane; c < c0 + D; c += 32) {
    const int64_t i = n * C + c;
    const A gamma = w ? w[c] : A(1), beta = bias ? bias[c] : A(0);
    const A mod = scale ? A(1) + scale[i] : A(1), off = shift ? shift[i] : A(0);
    m[i] = mu;
    a[i] = gamma * r * mod;
    b[i] = beta * mod + off;
  }
}

// Per (n, c), from given mean/rstd (the backward): m, a, b as above.
template <typename A>
__global__ void fold_coefficients_nc(const A* __restrict__ mean, const A* __restrict__ rstd, const A* __restrict__ w,
                                     const A* __restrict__ bias, const A* __restrict__ scale,
                                     const A* __restrict__ shift, int64_t N, int64_t C, int64_t D,
                                     A* __restrict__ m, A* __restrict__ a, A* __restrict__ b) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * C) return;
  const int64_t c = i % C;
  const A gamma = w ? w[c] : A(1), beta = bias ? bias[c] : A(0);
  const A mod = scale ? A(1) + scale[i] : A(1), off = shift ? shift[i] : A(0);
  m[i] = mean[i / D];
  a[i] = gamma * rstd[i / D] * mod;
  b[i] = beta * mod + off;
}

// Per (n, g), one warp each (kWarpRows groups per block): total each
// channel's S slices across the lanes (sums[0] = DS, sums[1] = DB per (n, c),
// float64, for grad_params_blocks), d scale / d shift, and the group's c2, c3
// written per (n, c) of the group. Sums are symmetric, so every lane holds
// the same totals after the butterfly.
template <typename A>
__global__ void grad_finalize_groups(const GradSums<A>* __restrict__ partial, const A* __restrict__ rstd,
                                     const A* __restrict__ w, const A* __restrict__ bias,
                                     const A* __restrict__ scale, int64_t N, int64_t G, int64_t D, int64_t S,
                                     double M, double* __restrict__ ds, double* __restrict__ db,
                                     double* __restrict__ dscale, double* __restrict__ dshift,
                                     A* __restrict__ c2, A* __restrict__ c3) {
  const int64_t ng = int64_t(blockIdx.x) * kWarpRows + threadIdx.y;
  if (ng >= N * G) return;  // the whole warp leaves together
  const int lane = threadIdx.x;
  const int64_t C = G * D, n = ng / G, g = ng % G;
  const double r = static_cast<double>(rstd[ng]);
  double sa = 0, sb = 0;
  for (int64_t c = g * D; c < (g + 1) * D; ++c) {
    const int64_t i = n * C + c;
    GradSums<double> t{0.0, 0.0};
    for (int64_t s = lane; s < S; s += 32) {
      t.ds += static_cast<double>(partial[i * S + s].ds);
      t.db += static_cast<double>(partial[i * S + s].db);
    }
    t = warp_allreduce(t);
    const double gamma = w ? static_cast<double>(w[c]) : 1.0;
    if (lane == 0) {
      ds[i] = t.ds;
      db[i] = t.db;
      if (dscale) {
        const double beta = bias ? static_cast<double>(bias[c]) : 0.0;
        dscale[i] = gamma * r * t.ds + beta * t.db;
        dshift[i] = t.db;
      }
    }
    const double gk = gamma * (scale ? 1.0 + static_cast<double>(scale[i]) : 1.0);
    sa += gk * t.ds;
    sb += gk * t.db;
  }
  const A k2 = static_cast<A>(-sa * r * r * r / M), k3 = static_cast<A>(-sb * r / M);
  for (int64_t c = g * D + lane; c < (g + 1) * D; c += 32) {
    c2[n * C + c] = k2;
    c3[n * C + c] = k3;
  }
}

// Per c (one block each): d weight = sum_n (1 + scale) rstd DS, d bias =
// sum_n (1 + scale) DB, the samples spread over the block's threads; written
// as O, as grad_params writes them.
template <typename A, typename O>
__global__ void grad_params_blocks(const double* __restrict__ ds, const double* __restrict__ db,
                                   const A* __restrict__ rstd, const A* __restrict__ scale, int64_t N, int64_t C,
                                   int64_t D, O* __restrict__ dw, O* __restrict__ dbias) {
  __shared__ double sw_shared[kRowThreads], sb_shared[kRowThreads];
  const int64_t c = blockIdx.x, G = C / D;
  double sw = 0, sb = 0;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int64_t i = n * C + c;
    const double k = scale ? 1.0 + static_cast<double>(scale[i]) : 1.0;
    sw += k * static_cast<double>(rstd[n * G + c / D]) * ds[i];
    sb += k * db[i];
  }
  sw_shared[threadIdx.x] = sw;
  sb_shared[threadIdx.x] = sb;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      sw_shared[threadIdx.x] += sw_shared[threadIdx.x + stride];
      sb_shared[threadIdx.x] += sb_shared[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    dw[c] = static_cast<O>(sw_shared[0]);
    dbias[c] = static_cast<O>(sb_shared[0]);
  }
}

// The (n, c) index of the vector of V elements starting at element i, as
// the apply kernels below lay them out: channels-last, its first channel's
// (the V channels are nc .. nc + V - 1); contiguous, its row's.
template <bool ChannelsLast>
__device__ __forceinline__ uint32_t vec_nc(uint32_t i, IntDivider<uint32_t> div_c, IntDivider<uint32_t> div_l,
                                           uint32_t C) {
  if (ChannelsLast) {
    const auto q = div_c.divmod(i);
    return div_l.div(q.div) * C + q.mod;
  }
  return div_c.div(i);
}

// y = SiLU((x - m) a + b), V elements per thread. Channels-last: the V
// elements are consecutive channels of one (n, l): div_c divides by C, div_l
// by L. Contiguous: they lie in one row nc; div_c divides by L.
template <typename T, typename A, int V, bool ChannelsLast>
__global__ void apply_forward_vec(const T* __restrict__ x, T* __restrict__ y, const A* __restrict__ m,
                                  const A* __restrict__ a, const A* __restrict__ b, uint32_t nvec,
                                  IntDivider<uint32_t> div_c, IntDivider<uint32_t> div_l, uint32_t C, bool act) {
  for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < nvec; j += blockDim.x * gridDim.x) {
    const uint32_t i = j * V;
    const Vec<T, V> xv = *reinterpret_cast<const Vec<T, V>*>(x + i);
    Vec<T, V> yv;
    const uint32_t nc0 = vec_nc<ChannelsLast>(i, div_c, div_l, C);
    if (ChannelsLast) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const A z = (static_cast<A>(xv.v[v]) - m[nc0 + v]) * a[nc0 + v] + b[nc0 + v];
        yv.v[v] = static_cast<T>(activate(z, act));
      }
    } else {
      const A mn = m[nc0], an = a[nc0], bn = b[nc0];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const A z = (static_cast<A>(xv.v[v]) - mn) * an + bn;
        yv.v[v] = static_cast<T>(activate(z, act));
      }
    }
    *reinterpret_cast<Vec<T, V>*>(y + i) = yv;
  }
}

// dx = a dz + c2 (x - m) + c3, V elements per thread, laid out as above.
template <typename T, typename A, int V, bool ChannelsLast>
__global__ void apply_backward_vec(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                   const A* __restrict__ m, const A* __restrict__ a, const A* __restrict__ b,
                                   const A* __restrict__ c2, const A* __restrict__ c3, uint32_t nvec,
                                   IntDivider<uint32_t> div_c, IntDivider<uint32_t> div_l, uint32_t C, bool act) {
  for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < nvec; j += blockDim.x * gridDim.x) {
    const uint32_t i = j * V;
    const Vec<T, V> xv = *reinterpret_cast<const Vec<T, V>*>(x + i);
    const Vec<T, V> gv = *reinterpret_cast<const Vec<T, V>*>(dy + i);
    Vec<T, V> out;
    const uint32_t nc0 = vec_nc<ChannelsLast>(i, div_c, div_l, C);
    if (ChannelsLast) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const uint32_t nc = nc0 + v;
        const A xc = static_cast<A>(xv.v[v]) - m[nc];
        const A d = activate_grad(static_cast<A>(gv.v[v]), xc * a[nc] + b[nc], act);
        out.v[v] = static_cast<T>(a[nc] * d + c2[nc] * xc + c3[nc]);
      }
    } else {
      const A mn = m[nc0], an = a[nc0], bn = b[nc0], k2 = c2[nc0], k3 = c3[nc0];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const A xc = static_cast<A>(xv.v[v]) - mn;
        const A d = activate_grad(static_cast<A>(gv.v[v]), xc * an + bn, act);
        out.v[v] = static_cast<T>(an * d + k2 * xc + k3);
      }
    }
    *reinterpret_cast<Vec<T, V>*>(dx + i) = out;
  }
}

// ---------------------------------------------------------------- launchers

// Blocks for one thread per item (the small kernels have no grid-stride
// loop, so every item needs its thread; gridDim.x goes to 2^31 - 1).
inline int blocks_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), message("iddpm_fast gn_silu (CUDA): ", n,
              " items exceed one grid"));
  return static_cast<int>(std::max<int64_t>(blocks, 1));
}

// Slice length and count along the positions: S <= 65535 (a grid dimension).
inline void slices(const GnShape& s, int64_t& slice, int64_t& S) {
  slice = std::max(kPositionsPerSlice, (s.L + kMaxSlices - 1) / kMaxSlices);
  S = (s.L + slice - 1) / slice;
  TORCH_CHECK(s.N * s.C <= std::numeric_limits<int32_t>::max() && s.N <= std::numeric_limits<int32_t>::max(), message("iddpm_fast gn_silu (CUDA): N * C = ", s.N * s.C, " exceeds one grid dimension"));
}

inline int sm_count() {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  return sms;
}

inline int elementwise_blocks(int64_t numel) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((numel + 255) / 256, int64_t(sm_count()) * 32)));
}

template <typename A>
const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

// Whether the vectorised kernels apply (see their section): x and the
// other element tensors given, V elements per 16-byte load.
// IDDPM_FAST_GN_CUDA_VEC=0 turns the vectorised kernels off (read per call,
// so that one process can time both; a switch for diagnosis, not tuning).
inline bool use_vec(const GnShape& s, int64_t numel, int V, std::initializer_list<const void*> ptrs) {
  if (cuda_vec::switched_off("IDDPM_FAST_GN_CUDA_VEC")) return false;
  if (numel >= (int64_t(1) << 31) || (s.channels_last ? s.C % V : s.L % V) != 0) return false;
  for (const void* p : ptrs) {
    if (!cuda_vec::aligned16(p)) return false;
  }
  return true;
}

// Contiguous rows too long for one warp, vectorised: slices as above rounded
// up to whole vectors, kRowThreads threads per (row, slice).
inline int row_slices_vec(const GnShape& s, int V, int64_t& slice, int64_t& S) {
  slices(s, slice, S);
  slice = (slice + V - 1) / V * V;
  S = (s.L + slice - 1) / slice;
  return kRowThreads;
}

// Contiguous rows short enough for one warp each (at most eight 16-byte
// loads per lane): the warp-per-row kernels, ceil(N*C / kWarpRows) blocks.
inline bool rows_per_warp(const GnShape& s, int V) {
  return s.L <= int64_t(32) * V * 8;
}

inline unsigned warp_row_blocks(const GnShape& s) {
  const int64_t blocks = (s.N * s.C + kWarpRows - 1) / kWarpRows;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              message("iddpm_fast gn_silu (CUDA): N * C = ", s.N * s.C, " exceeds one grid"));
  return static_cast<unsigned>(blocks);
}

// One warp per (n, g) for the finalize kernels of the vectorised path.
inline unsigned warp_group_blocks(const GnShape& s) {
  const int64_t blocks = (s.N * s.G + kWarpRows - 1) / kWarpRows;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              message("iddpm_fast gn_silu (CUDA): N * groups = ", s.N * s.G, " exceeds one grid"));
  return static_cast<unsigned>(blocks);
}

// Channels-last, vectorised: a (TX, TY) block, TX channel vectors (at most
// 32) by TY position lanes, and enough slices along the positions that the
// grid holds about four blocks per multiprocessor (each slice at least 64
// positions long, at most 65535 slices).
inline void cl_launch_vec(const GnShape& s, int V, dim3& grid, dim3& block, int64_t& slice, int64_t& S) {
  const int64_t cv = s.C / V;
  const int tx = static_cast<int>(std::min<int64_t>(cv, 32));
  const int ty = kRowThreads / tx;
  const int64_t blocks_c = (cv + tx - 1) / tx;
  TORCH_CHECK(s.N <= std::numeric_limits<int32_t>::max() && blocks_c <= kMaxSlices,
              message("iddpm_fast gn_silu (CUDA): shape [N=", s.N, ", C=", s.C, "] exceeds one grid"));
  const int64_t base = s.N * blocks_c;
  int64_t want = std::max<int64_t>(1, (int64_t(4) * sm_count() + base - 1) / base);
  want = std::min<int64_t>(want, std::max<int64_t>(1, s.L / 64));
  slice = std::max<int64_t>((s.L + want - 1) / want, (s.L + kMaxSlices - 1) / kMaxSlices);
  S = (s.L + slice - 1) / slice;
  grid = dim3(static_cast<unsigned>(s.N), static_cast<unsigned>(blocks_c), static_cast<unsigned>(S));
  block = dim3(tx, ty);
}

// The vectorised path's partial kernel (statistics in the forward, gradient
// sums in the backward: the same plan for both) and its launch shape.
enum class VecPartials { ChannelsLast, WarpRows, Rows };

struct VecPlan {
  VecPartials kind;
  dim3 grid, block;
  int64_t slice, S;  // positions per slice, slices per (n, c)
};

inline VecPlan plan_vec_partials(const GnShape& s, int V) {
  VecPlan p;
  if (s.channels_last) {
    p.kind = VecPartials::ChannelsLast;
    cl_launch_vec(s, V, p.grid, p.block, p.slice, p.S);
  } else if (rows_per_warp(s, V)) {
    p.kind = VecPartials::WarpRows;
    p.slice = s.L;
    p.S = 1;
    p.grid = dim3(warp_row_blocks(s));
    p.block = dim3(32, kWarpRows);
  } else {
    p.kind = VecPartials::Rows;
    const int threads = row_slices_vec(s, V, p.slice, p.S);
    p.grid = dim3(s.N * s.C, p.S);
    p.block = dim3(threads);
  }
  return p;
}

// f(d weight, d bias) with the pointers typed as the buffers are
// (param_grad_buffer_dtype: float32 or float64).
template <typename F>
inline void with_param_grads(const at::Tensor& gw, const at::Tensor& gb, F f) {
  if (gw.scalar_type() == at::kFloat) {
    f(gw.data_ptr<float>(), gb.data_ptr<float>());
  } else {
    f(gw.data_ptr<double>(), gb.data_ptr<double>());
  }
}

// Whether to try the one-pass kernels (each still checks that it applies).
// IDDPM_FAST_GN_CUDA_ONEPASS=1: wherever they apply; =0: never;
// IDDPM_FAST_GN_CUDA_VEC=0 (the per-element kernels, for diagnosis): never.
// Unset, where an H100 timed them faster than the split kernels
// (bench/results/h100-20261126, profile_gpu.py ab_gn, device time): groups
// of at most 2048 elements in every layout and dtype (the 16x16 and 8x8
// levels of a 128-channel UNet: forward 1.2-2.0x, backward 1.2-4.6x faster,
// forward + backward 2.8-7.9x stock where the split kernels gave 0.8-5.6x),
// and float32 NCHW (32x32 levels: forward 1.6x, backward 1.2-1.3x); bf16 and
// channels-last 32x32 levels stay on the split kernels, which were faster there.
template <typename T>
inline bool onepass_wanted(const GnShape& s) {
  if (cuda_vec::switched_off("IDDPM_FAST_GN_CUDA_VEC") || cuda_vec::switched_off("IDDPM_FAST_GN_CUDA_ONEPASS")) {
    return false;
  }
  if (cuda_vec::switched_on("IDDPM_FAST_GN_CUDA_ONEPASS")) return true;
  return s.D * s.L <= 2048 || (std::is_same<T, float>::value && !s.channels_last);
}

// Launches a one-pass kernel on `blocks` blocks (N * G, over the groups per
// slab for the forward's channels-last slabs).
struct OnePassLaunch {
  unsigned blocks;
  cudaStream_t stream;

  template <typename Kernel, typename A>
  void operator()(Kernel kernel, const A& args) const {
    kernel<<<blocks, gn_onepass::kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Runs the one-pass forward and returns true where it applies: float32,
// float16 or bfloat16 x; x and y 16-byte aligned; a group (or a slab of
// groups) of at most 8 16-byte packs per thread (gn_onepass::plan); and at
// least one block per multiprocessor (with fewer groups the split kernels, which spread a group
// over many blocks, use more of the GPU); and where onepass_wanted (the
// default policy, or IDDPM_FAST_GN_CUDA_ONEPASS, read per call, which
// switches the one-pass backward too).
template <typename T>
bool onepass_forward(const GnShape& s, const at::Tensor& x, const at::Tensor& y, const at::Tensor& w,
                     const at::Tensor& b, const at::Tensor& sc, const at::Tensor& sh, double eps,
                     const at::Tensor& mean, const at::Tensor& rstd, cudaStream_t stream) {
  if constexpr (std::is_same<T, double>::value) {
    return false;
  } else {
    if (!onepass_wanted<T>(s)) return false;
    if (!cuda_vec::aligned16(x.data_ptr()) || !cuda_vec::aligned16(y.data_ptr())) return false;
    const int sms = sm_count();
    gn_onepass::Plan p = gn_onepass::plan(s.N, s.G, s.D, s.L, s.channels_last, vec_width<T>());
    if (p.gpb > 1 && s.N * s.G / p.gpb < sms) {
      // Too few slabs to fill the GPU: one group per block, if that fills it.
      p = gn_onepass::plan(s.N, s.G, s.D, s.L, s.channels_last, vec_width<T>(), /*slabs=*/false);
    }
    const int64_t blocks = s.N * s.G / p.gpb;
    if (p.w == 0 || blocks < sms) return false;
    gn_onepass::Args<T, float> a = gn_onepass::args_from<T>(x, w, b, sc, sh, mean, rstd, s.G, s.D, s.L, s.silu);
    a.y = y.data_ptr<T>();
    a.eps = static_cast<float>(eps);
    return gn_onepass::run<false>(p, s.channels_last, a, OnePassLaunch{static_cast<unsigned>(blocks), stream});
  }
}

// The one-pass backward (gn_onepass.h) and the d weight / d bias kernel
// after it, where they apply: the forward's conditions (onepass_forward)
// with gn_onepass::backward_plan's, and dy, dx aligned too. Same switch.
template <typename T>
bool onepass_backward(const GnShape& s, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx,
                      const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& w, const at::Tensor& b,
                      const at::Tensor& sc, const at::Tensor& sh, const at::Tensor& gsc, const at::Tensor& gsh,
                      const at::Tensor& gw, const at::Tensor& gb, cudaStream_t stream) {
  if constexpr (std::is_same<T, double>::value) {
    return false;
  } else {
    if (!onepass_wanted<T>(s)) return false;
    for (const at::Tensor* t : {&dy, &x, &dx}) {
      if (!cuda_vec::aligned16(t->data_ptr())) return false;
    }
    if (s.N * s.G < sm_count()) return false;
    const gn_onepass::Plan p = gn_onepass::backward_plan(s.N, s.G, s.D, s.L, s.channels_last, vec_width<T>());
    if (p.w == 0) return false;
    at::Tensor sums = at::empty({2, s.N * s.C}, x.options().dtype(at::kDouble));
    gn_onepass::Args<T, float> a = gn_onepass::args_from<T>(x, w, b, sc, sh, mean, rstd, s.G, s.D, s.L, s.silu);
    a.dy = dy.data_ptr<T>();
    a.dx = dx.data_ptr<T>();
    a.ds = sums[0].data_ptr<double>();
    a.db = sums[1].data_ptr<double>();
    a.dscale = sc.defined() ? gsc.data_ptr<double>() : nullptr;
    a.dshift = sc.defined() ? gsh.data_ptr<double>() : nullptr;
    if (!gn_onepass::run<true>(p, s.channels_last, a, OnePassLaunch{static_cast<unsigned>(s.N * s.G), stream})) {
      return false;
    }
    with_param_grads(gw, gb, [&](auto* pw, auto* pb) {
      using O = std::remove_pointer_t<decltype(pw)>;
      grad_params_blocks<float, O><<<static_cast<unsigned>(s.C), kRowThreads, 0, stream>>>(
          a.ds, a.db, a.rstd, a.scale, s.N, s.C, s.D, pw, pb);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_silu_forward_cuda(const at::Tensor& x_in,
                                                                     const c10::optional<at::Tensor>& weight,
                                                                     const c10::optional<at::Tensor>& bias,
                                                                     const c10::optional<at::Tensor>& scale,
                                                                     const c10::optional<at::Tensor>& shift,
                                                                     int64_t num_groups, double eps, bool silu) {
  const char* op = "iddpm_fast::gn_silu_forward";
  GnShape s = check_inputs(op, x_in, weight, bias, scale, shift, num_groups);
  s.silu = silu;
  TORCH_CHECK(x_in.is_cuda(), message(op, " (CUDA kernel): x must be on a CUDA device, got ", x_in.device()));
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = dense(x_in);
  s.channels_last = stored_channels_last(x);
  const auto st = stat_type(x);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) {
    return {y, at::zeros({s.N, s.G}, x.options().dtype(st)), at::zeros({s.N, s.G}, x.options().dtype(st))};
  }
  at::Tensor mean = at::empty({s.N, s.G}, x.options().dtype(st));
  at::Tensor rstd = at::empty({s.N, s.G}, x.options().dtype(st));
  at::Tensor w = as_stat(weight, st), b = as_stat(bias, st), sc = as_stat(scale, st), sh = as_stat(shift, st);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gn_silu_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    constexpr int V = vec_width<scalar_t>();
    const int64_t numel = x.numel();
    if (onepass_forward<scalar_t>(s, x, y, w, b, sc, sh, eps, mean, rstd, stream)) {
      return;
    }
    if (use_vec(s, numel, V, {x.data_ptr(), y.data_ptr()})) {
      const VecPlan plan = plan_vec_partials(s, V);
      const int64_t S = plan.S;
      at::Tensor partial = at::empty({s.N * s.C * S * 3}, x.options().dtype(st));
      auto* pw = reinterpret_cast<Welford<A>*>(partial.data_ptr<A>());
      const scalar_t* px = x.data_ptr<scalar_t>();
      switch (plan.kind) {
        case VecPartials::ChannelsLast:
          stats_partial_cl_vec<scalar_t, A, V><<<plan.grid, plan.block, 0, stream>>>(px, s.L, s.C, S, plan.slice,
                                                                                    pw);
          break;
        case VecPartials::WarpRows:
          stats_partial_rows_warp<scalar_t, A, V><<<plan.grid, plan.block, 0, stream>>>(px, s.N * s.C, s.L, pw);
          break;
        case VecPartials::Rows:
          stats_partial_rows_vec<scalar_t, A, V><<<plan.grid, plan.block, 0, stream>>>(px, s.L, S, plan.slice, pw);
          break;
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor coef = at::empty({3, s.N * s.C}, x.options().dtype(st));
      A* pm = coef[0].data_ptr<A>();
      A* pa = coef[1].data_ptr<A>();
      A* pb = coef[2].data_ptr<A>();
      stats_finalize_fold<A><<<warp_group_blocks(s), dim3(32, kWarpRows), 0, stream>>>(
          pw, ptr_or_null<A>(w), ptr_or_null<A>(b), ptr_or_null<A>(sc), ptr_or_null<A>(sh), s.N, s.G, s.D, S, eps,
          mean.data_ptr<A>(), rstd.data_ptr<A>(), pm, pa, pb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const uint32_t nvec = static_cast<uint32_t>(numel / V);
      const IntDivider<uint32_t> div_c(static_cast<uint32_t>(s.channels_last ? s.C : s.L));
      const IntDivider<uint32_t> div_l(static_cast<uint32_t>(s.L));
      if (s.channels_last) {
        apply_forward_vec<scalar_t, A, V, true><<<elementwise_blocks(nvec), 256, 0, stream>>>(
            x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pm, pa, pb, nvec, div_c, div_l,
            static_cast<uint32_t>(s.C), s.silu);
      } else {
        apply_forward_vec<scalar_t, A, V, false><<<elementwise_blocks(nvec), 256, 0, stream>>>(
            x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pm, pa, pb, nvec, div_c, div_l,
            static_cast<uint32_t>(s.C), s.silu);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    int64_t slice, S;
    slices(s, slice, S);
    at::Tensor partial = at::empty({s.N * s.C * S * 3}, x.options().dtype(st));
    auto* pw = reinterpret_cast<Welford<A>*>(partial.data_ptr<A>());
    if (s.channels_last) {
      dim3 grid(s.N, (s.C + kTileC - 1) / kTileC, S), block(kTileC, kTileL);
      stats_partial_tiles<scalar_t, A><<<grid, block, 0, stream>>>(x.data_ptr<scalar_t>(), s.L, s.C, S, slice, pw);
    } else {
      dim3 grid(s.N * s.C, S);
      stats_partial_rows<scalar_t, A><<<grid, kRowThreads, 0, stream>>>(x.data_ptr<scalar_t>(), s.L, S, slice, pw);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stats_finalize<A><<<blocks_for(s.N * s.G, 256), 256, 0, stream>>>(pw, s.N, s.G, s.D, S, eps, mean.data_ptr<A>(),
                                                                       rstd.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor coef = at::empty({2, s.N, s.C}, x.options().dtype(st));
    A* pa = coef[0].data_ptr<A>();
    A* pb = coef[1].data_ptr<A>();
    fold_coefficients<A><<<blocks_for(s.N * s.C, 256), 256, 0, stream>>>(
        rstd.data_ptr<A>(), ptr_or_null<A>(w), ptr_or_null<A>(b), ptr_or_null<A>(sc), ptr_or_null<A>(sh), s.N, s.C,
        s.D, pa, pb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (s.channels_last) {
      apply_forward<scalar_t, A, true><<<elementwise_blocks(numel), 256, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<A>(), pa, pb, numel, s.C, s.D, s.L, s.silu);
    } else {
      apply_forward<scalar_t, A, false><<<elementwise_blocks(numel), 256, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<A>(), pa, pb, numel, s.C, s.D, s.L, s.silu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_silu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    int64_t num_groups, bool silu) {
  const char* op = "iddpm_fast::gn_silu_backward";
  GnShape s = check_inputs(op, x_in, weight, bias, scale, shift, num_groups);
  s.silu = silu;
  TORCH_CHECK(x_in.is_cuda(), message(op, " (CUDA kernel): x must be on a CUDA device, got ", x_in.device()));
  check_backward_inputs(op, grad_y, x_in, mean_in, rstd_in, s);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = dense(x_in);
  s.channels_last = stored_channels_last(x);
  at::Tensor dy = dense_like(grad_y, x);
  const auto st = stat_type(x);
  const bool has_scale = scale.has_value() && scale->defined();
  at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor w = as_stat(weight, st), b = as_stat(bias, st), sc = as_stat(scale, st), sh = as_stat(shift, st);
  at::Tensor dx = at::empty_like(x);
  // Every kernel path below writes all of these when x has elements.
  const auto dbl = x.options().dtype(at::kDouble);
  const bool empty = x.numel() == 0;
  const auto pdt = x.options().dtype(param_grad_buffer_dtype(weight, bias));
  at::Tensor gw = empty ? at::zeros({s.C}, pdt) : at::empty({s.C}, pdt);
  at::Tensor gb = empty ? at::zeros({s.C}, pdt) : at::empty({s.C}, pdt);
  at::Tensor gsc = empty ? at::zeros({has_scale ? s.N : 0, s.C}, dbl) : at::empty({has_scale ? s.N : 0, s.C}, dbl);
  at::Tensor gsh = empty ? at::zeros({has_scale ? s.N : 0, s.C}, dbl) : at::empty({has_scale ? s.N : 0, s.C}, dbl);
  if (!empty) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gn_silu_backward_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      constexpr int V = vec_width<scalar_t>();
      const int64_t numel = x.numel();
      const A* pmean = mean.data_ptr<A>();
      const A* prstd = rstd.data_ptr<A>();
      if (onepass_backward<scalar_t>(s, dy, x, dx, mean, rstd, w, b, sc, sh, gsc, gsh, gw, gb, stream)) {
        return;
      }
      if (use_vec(s, numel, V, {x.data_ptr(), dy.data_ptr(), dx.data_ptr()})) {
        at::Tensor coef = at::empty({5, s.N * s.C}, x.options().dtype(st));
        A* pm = coef[0].data_ptr<A>();
        A* pa = coef[1].data_ptr<A>();
        A* pb = coef[2].data_ptr<A>();
        A* c2 = coef[3].data_ptr<A>();
        A* c3 = coef[4].data_ptr<A>();
        fold_coefficients_nc<A><<<blocks_for(s.N * s.C, 256), 256, 0, stream>>>(
            pmean, prstd, ptr_or_null<A>(w), ptr_or_null<A>(b), ptr_or_null<A>(sc), ptr_or_null<A>(sh), s.N, s.C,
            s.D, pm, pa, pb);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const VecPlan plan = plan_vec_partials(s, V);
        const int64_t S = plan.S;
        at::Tensor partial = at::empty({s.N * s.C * S * 2}, x.options().dtype(st));
        auto* pg = reinterpret_cast<GradSums<A>*>(partial.data_ptr<A>());
        const scalar_t* pdy = dy.data_ptr<scalar_t>();
        const scalar_t* px = x.data_ptr<scalar_t>();
        switch (plan.kind) {
          case VecPartials::ChannelsLast:
            grad_partial_cl_vec<scalar_t, A, V><<<plan.grid, plan.block, 0, stream>>>(pdy, px, pm, pa, pb, s.L, s.C,
                                                                                       S, plan.slice, pg, s.silu);
            break;
          case VecPartials::WarpRows:
            grad_partial_rows_warp<scalar_t, A, V><<<plan.grid, plan.block, 0, stream>>>(pdy, px, pm, pa, pb,
                                                                                          s.N * s.C, s.L, pg, s.silu);
            break;
          case VecPartials::Rows:
            grad_partial_rows_vec<scalar_t, A, V><<<plan.grid, plan.block, 0, stream>>>(pdy, px, pm, pa, pb, s.L, S,
                                                                                         plan.slice, pg, s.silu);
            break;
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        at::Tensor sums = at::empty({2, s.N * s.C}, dbl);
        double* ds = sums[0].data_ptr<double>();
        double* db = sums[1].data_ptr<double>();
        grad_finalize_groups<A><<<warp_group_blocks(s), dim3(32, kWarpRows), 0, stream>>>(
            pg, prstd, ptr_or_null<A>(w), ptr_or_null<A>(b), ptr_or_null<A>(sc), s.N, s.G, s.D, S,
            static_cast<double>(s.D * s.L), ds, db, has_scale ? gsc.data_ptr<double>() : nullptr,
            has_scale ? gsh.data_ptr<double>() : nullptr, c2, c3);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        with_param_grads(gw, gb, [&](auto* pw, auto* pb) {
          using O = std::remove_pointer_t<decltype(pw)>;
          grad_params_blocks<A, O><<<static_cast<unsigned>(s.C), kRowThreads, 0, stream>>>(
              ds, db, prstd, ptr_or_null<A>(sc), s.N, s.C, s.D, pw, pb);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const uint32_t nvec = static_cast<uint32_t>(numel / V);
        const IntDivider<uint32_t> div_c(static_cast<uint32_t>(s.channels_last ? s.C : s.L));
        const IntDivider<uint32_t> div_l(static_cast<uint32_t>(s.L));
        if (s.channels_last) {
          apply_backward_vec<scalar_t, A, V, true><<<elementwise_blocks(nvec), 256, 0, stream>>>(
              dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), pm, pa, pb, c2, c3, nvec,
              div_c, div_l, static_cast<uint32_t>(s.C), s.silu);
        } else {
          apply_backward_vec<scalar_t, A, V, false><<<elementwise_blocks(nvec), 256, 0, stream>>>(
              dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), pm, pa, pb, c2, c3, nvec,
              div_c, div_l, static_cast<uint32_t>(s.C), s.silu);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      int64_t slice, S;
      slices(s, slice, S);
      at::Tensor coef = at::empty({2, s.N, s.C}, x.options().dtype(st));
      A* pa = coef[0].data_ptr<A>();
      A* pb = coef[1].data_ptr<A>();
      const A* pm = mean.data_ptr<A>();
      const A* pr = rstd.data_ptr<A>();
      fold_coefficients<A><<<blocks_for(s.N * s.C, 256), 256, 0, stream>>>(
          pr, ptr_or_null<A>(w), ptr_or_null<A>(b), ptr_or_null<A>(sc), ptr_or_null<A>(sh), s.N, s.C, s.D, pa, pb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor partial = at::empty({s.N * s.C * S * 2}, x.options().dtype(st));
      auto* pg = reinterpret_cast<GradSums<A>*>(partial.data_ptr<A>());
      if (s.channels_last) {
        dim3 grid(s.N, (s.C + kTileC - 1) / kTileC, S), block(kTileC, kTileL);
        grad_partial_tiles<scalar_t, A><<<grid, block, 0, stream>>>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                                    pm, pa, pb, s.L, s.C, s.D, S, slice, pg, s.silu);
      } else {
        dim3 grid(s.N * s.C, S);
        grad_partial_rows<scalar_t, A><<<grid, kRowThreads, 0, stream>>>(
            dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), pm, pa, pb, s.L, s.D, S, slice, pg, s.silu);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor sums = at::empty({2, s.N, s.C}, dbl);
      double* ds = sums[0].data_ptr<double>();
      double* db = sums[1].data_ptr<double>();
      grad_finalize_channels<A><<<blocks_for(s.N * s.C, 256), 256, 0, stream>>>(
          pg, pm, pr, ptr_or_null<A>(w), ptr_or_null<A>(b), s.N, s.C, s.D, S, has_scale, ds, db,
          has_scale ? gsc.data_ptr<double>() : nullptr, has_scale ? gsh.data_ptr<double>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor groups = at::empty({2, s.N, s.G}, x.options().dtype(st));
      A* c2 = groups[0].data_ptr<A>();
      A* c3 = groups[1].data_ptr<A>();
      grad_group_coefficients<A><<<blocks_for(s.N * s.G, 256), 256, 0, stream>>>(
          ds, db, pm, pr, ptr_or_null<A>(w), ptr_or_null<A>(sc), s.N, s.C, s.D, static_cast<double>(s.D * s.L), c2,
          c3);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      with_param_grads(gw, gb, [&](auto* pw, auto* pb) {
        using O = std::remove_pointer_t<decltype(pw)>;
        grad_params<A, O><<<blocks_for(s.C, 256), 256, 0, stream>>>(ds, db, pm, pr, ptr_or_null<A>(sc), s.N, s.C,
                                                                    s.D, pw, pb);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (s.channels_last) {
        apply_backward<scalar_t, A, true><<<elementwise_blocks(numel), 256, 0, stream>>>(
            dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), pm, pa, pb, c2, c3, numel, s.C,
            s.D, s.L, s.silu);
      } else {
        apply_backward<scalar_t, A, false><<<elementwise_blocks(numel), 256, 0, stream>>>(
            dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), pm, pa, pb, c2, c3, numel, s.C,
            s.D, s.L, s.silu);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return backward_outputs(dx, gw, gb, gsc, gsh, weight, bias, scale, shift);
}

}  // namespace

TORCH_LIBRARY_IMPL(iddpm_fast, CUDA, m) {
  m.impl("gn_silu_forward", &gn_silu_forward_cuda);
  m.impl("gn_silu_backward", &gn_silu_backward_cuda);
}

}  // namespace iddpm_fast
