// One-pass forward and backward of GroupNorm(-scale-shift)-SiLU for groups
// that fit in registers: one block of kThreads threads per (sample, group).
// The forward loads the group once, reduces its mean, then the squared
// deviations from that mean (a true two-pass variance, from registers),
// folds weight, bias, scale and shift into one multiply-add per channel, and
// writes y: x is read once, in one launch, where the split plan of
// gn_silu_cuda.cu (partial statistics over many blocks, a merge, an
// elementwise pass) reads x twice in three launches. The backward likewise
// reads x and dy once (backward_kernel). The split plan stays for the groups
// these cannot hold and for grids too small to fill the GPU (few samples).
//
// The kernels are written against a handful of primitives (thread and block
// index, barrier, warp shuffle, exp) so that the same source also runs on
// the CPU under an emulation of a thread block
// (tests/cpp/gn_onepass_emulation.cpp, which defines GN_ONEPASS_EMULATED
// and these macros before including this file); the test suite checks it
// there against the reference on machines without a GPU.
#pragma once

#include <cstdint>

#ifndef GN_ONEPASS_EMULATED
#define GN1_DEVICE __device__ __forceinline__
#define GN1_KERNEL __global__ __launch_bounds__(256)
#define GN1_SHARED __shared__
#define GN1_TID static_cast<int>(threadIdx.x)
#define GN1_BID static_cast<int>(blockIdx.x)
#define GN1_SYNC() __syncthreads()
#define GN1_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define GN1_EXP(z) __expf(z)
#define GN1_SQRT(v) sqrtf(v)
#endif

namespace iddpm_fast {
namespace gn_onepass {

constexpr int kThreads = 256;  // threads per block (GN1_KERNEL's launch bound)
constexpr int kWarps = kThreads / 32;
constexpr int kMaxPacksPerThread = 8;  // registers: at most 8 packs of 16 bytes per thread

// W elements of T moved as one access (W * sizeof(T) bytes: 16, or less
// where a channels-last group's channels do not fill 16 bytes).
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

// The sum of v over the block; every thread returns the same value (an xor
// butterfly leaves the same bits in every lane, and every warp reduces the
// same kWarps partials the same way). `scratch` holds kWarps values of
// shared memory that no other reduction in flight uses. Every thread of the
// block must call it (it has a barrier).
template <typename A>
GN1_DEVICE A block_sum(A v, A* scratch) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += GN1_SHFL_XOR(v, m);
  const int lane = GN1_TID % 32;
  if (lane == 0) scratch[GN1_TID / 32] = v;
  GN1_SYNC();
  v = lane < kWarps ? scratch[lane] : A(0);
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += GN1_SHFL_XOR(v, m);
  return v;
}

// Block (n, g) of a grid of N * G blocks, kThreads threads each.
// x, y: [N, C, L] contiguous (CL false) or [N, L, C] channels-last (CL true),
//   fewer than 2^31 elements, W * sizeof(T)-byte aligned.
// weight, bias: [C] or null; scale, shift: [N, C] or null (A = float).
// mean_out, rstd_out: [N, G].
// Group (n, g) holds channels g*D .. g*D + D - 1 (C = G * D), M = D * L
// elements, M / W packs; thread t holds packs t, t + kThreads, ... (K at
// most). Pack i starts at
//   contiguous:    (n C + g D) L + i W (L % W == 0: a pack is one channel's);
//   channels-last: (n L + i / (D/W)) C + g D + (i % (D/W)) W (D % W == 0).
template <typename T, typename A, int W, int K, bool CL>
GN1_KERNEL void forward_kernel(const T* __restrict__ x, T* __restrict__ y, const A* __restrict__ weight,
                               const A* __restrict__ bias, const A* __restrict__ scale, const A* __restrict__ shift,
                               int G, int D, int L, A eps, A* __restrict__ mean_out, A* __restrict__ rstd_out,
                               bool act) {
  GN1_SHARED A scratch[2][kWarps];
  GN1_SHARED A coef[2][kThreads];
  const int tid = GN1_TID;
  const int ng = GN1_BID;
  const int n = ng / G, g = ng - n * G;
  const int C = G * D;
  const int packs = D * L / W;
  const int per_pos = D / W;  // channels-last: packs per position
  const int base = CL ? n * L * C + g * D : (n * C + g * D) * L;
  // The sums run over x - k, k the group's first value, and k is added back
  // once: far from zero mean (|mean| / std ~ 1e4) a float32 sum of raw values
  // loses the digits that the deviations live in (as merge_vector in
  // gn_silu_cuda.cu).
  const A k = static_cast<A>(x[base]);
  Pack<T, W> r[K];
  A s = A(0);
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int i = tid + j * kThreads;
    if (i < packs) {
      const int off = CL ? base + (i / per_pos) * C + (i % per_pos) * W : base + i * W;
      r[j] = *reinterpret_cast<const Pack<T, W>*>(x + off);
#pragma unroll
      for (int v = 0; v < W; ++v) s += static_cast<A>(r[j].v[v]) - k;
    }
  }
  const A count = static_cast<A>(D * L);
  const A mean = k + block_sum(s, scratch[0]) / count;
  A q = A(0);
#pragma unroll
  for (int j = 0; j < K; ++j) {
    if (tid + j * kThreads < packs) {
#pragma unroll
      for (int v = 0; v < W; ++v) {
        const A d = static_cast<A>(r[j].v[v]) - mean;
        q += d * d;
      }
    }
  }
  const A var = block_sum(q, scratch[1]) / count;
  const A rstd = A(1) / GN1_SQRT(var + eps);
  if (tid == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  // z = (x - mean) a + b per channel: a = weight (1 + scale) rstd,
  // b = bias (1 + scale) + shift (fold_coefficients in gn_silu_cuda.cu).
  for (int c = tid; c < D; c += kThreads) {
    const int ch = g * D + c, nc = n * C + ch;
    const A gamma = weight ? weight[ch] : A(1), beta = bias ? bias[ch] : A(0);
    const A mod = scale ? A(1) + scale[nc] : A(1), off = shift ? shift[nc] : A(0);
    coef[0][c] = gamma * rstd * mod;
    coef[1][c] = beta * mod + off;
  }
  GN1_SYNC();
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int i = tid + j * kThreads;
    if (i < packs) {
      Pack<T, W> out;
      // First channel (within the group) of the pack's elements: in
      // channels-last consecutive elements are consecutive channels, in the
      // contiguous layout they share one.
      const int c0 = CL ? (i % per_pos) * W : i * W / L;
#pragma unroll
      for (int v = 0; v < W; ++v) {
        const int c = CL ? c0 + v : c0;
        const A z = (static_cast<A>(r[j].v[v]) - mean) * coef[0][c] + coef[1][c];
        out.v[v] = static_cast<T>(act ? z * (A(1) / (A(1) + GN1_EXP(-z))) : z);
      }
      const int off = CL ? base + (i / per_pos) * C + (i % per_pos) * W : base + i * W;
      *reinterpret_cast<Pack<T, W>*>(y + off) = out;
    }
  }
}

// The backward of the forward above, one block per (sample, group): x and
// dy are read once into registers; per-channel sums DS = sum dz (x - mean)
// and DB = sum dz (dz = dy SiLU'(z)) are reduced in a fixed order (no
// atomics: the results do not depend on scheduling); they give d scale,
// d shift and the group's dx coefficients, and are stored in float64 for the
// d weight / d bias kernel that sums them over the samples
// (grad_params_blocks in gn_silu_cuda.cu); dx = a dz + c2 (x - mean) + c3
// is written from the registers. Same shapes and layout as forward_kernel,
// with backward_plan's extra conditions: at most kMaxBackwardPacks packs per
// thread; contiguous, a channel's L / W packs
// are a power of two or a multiple of 32 (so a warp's lanes split into
// aligned runs of one channel); channels-last, a position's D / W packs are
// a power of two of at most 32 (so a thread meets the same W channels in all
// its packs).
// mean, rstd: [N, G]; ds, db: [N, C] float64; dscale, dshift: [N, C]
// float64 or null (without scale).
constexpr int kMaxBackwardPacks = 4;  // packs of x and of dy per thread: 8 would cost occupancy
constexpr int kMaxSlots = kThreads * kMaxBackwardPacks;

template <typename T, typename A, int W, int K, bool CL>
GN1_KERNEL void backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ mean_in,
                                const A* __restrict__ rstd_in, const A* __restrict__ weight,
                                const A* __restrict__ bias, const A* __restrict__ scale,
                                const A* __restrict__ shift, int G, int D, int L, T* __restrict__ dx,
                                double* __restrict__ ds, double* __restrict__ db, double* __restrict__ dscale,
                                double* __restrict__ dshift, bool act) {
  GN1_SHARED A coef[2][kThreads];    // a, b per channel of the group
  GN1_SHARED A slots[2][kMaxSlots];  // partial DS, DB (see below)
  GN1_SHARED A sums[2][kThreads];    // DS, DB per channel
  GN1_SHARED double scratch[2][kWarps];
  const int tid = GN1_TID, lane = tid % 32, warp = tid / 32;
  const int ng = GN1_BID;
  const int n = ng / G, g = ng - n * G;
  const int C = G * D;
  const int packs = D * L / W;
  const int per_pos = D / W;
  const int base = CL ? n * L * C + g * D : (n * C + g * D) * L;
  const A mean = mean_in[ng], rstd = rstd_in[ng];
  for (int c = tid; c < D; c += kThreads) {
    const int ch = g * D + c, nc = n * C + ch;
    const A gamma = weight ? weight[ch] : A(1), beta = bias ? bias[ch] : A(0);
    const A mod = scale ? A(1) + scale[nc] : A(1), off = shift ? shift[nc] : A(0);
    coef[0][c] = gamma * rstd * mod;
    coef[1][c] = beta * mod + off;
  }
  Pack<T, W> rx[K], rg[K];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int i = tid + j * kThreads;
    if (i < packs) {
      const int off = CL ? base + (i / per_pos) * C + (i % per_pos) * W : base + i * W;
      rx[j] = *reinterpret_cast<const Pack<T, W>*>(x + off);
      rg[j] = *reinterpret_cast<const Pack<T, W>*>(dy + off);
    }
  }
  GN1_SYNC();
  // dz (x - mean) and dz of element v of pack j, channel c (within the group).
  auto dz_of = [&](int j, int v, int c) {
    const A xc = static_cast<A>(rx[j].v[v]) - mean;
    const A z = xc * coef[0][c] + coef[1][c];
    const A gy = static_cast<A>(rg[j].v[v]);
    if (!act) return gy;
    const A sig = A(1) / (A(1) + GN1_EXP(-z));
    return gy * sig * (A(1) + z * (A(1) - sig));
  };
  if (CL) {
    // Thread t meets channels (t % per_pos) W .. + W - 1 in every pack.
    A acc_s[W], acc_b[W];
#pragma unroll
    for (int v = 0; v < W; ++v) acc_s[v] = acc_b[v] = A(0);
    const int c0 = (tid % per_pos) * W;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (tid + j * kThreads < packs) {
#pragma unroll
        for (int v = 0; v < W; ++v) {
          const A dz = dz_of(j, v, c0 + v);
          acc_s[v] += dz * (static_cast<A>(rx[j].v[v]) - mean);
          acc_b[v] += dz;
        }
      }
    }
    // Lanes with the same lane % per_pos hold the same channels: add them up.
#pragma unroll
    for (int v = 0; v < W; ++v) {
      for (int m = 16; m >= per_pos; m >>= 1) {
        acc_s[v] += GN1_SHFL_XOR(acc_s[v], m);
        acc_b[v] += GN1_SHFL_XOR(acc_b[v], m);
      }
    }
    if (lane < per_pos) {
#pragma unroll
      for (int v = 0; v < W; ++v) {
        slots[0][warp * D + c0 + v] = acc_s[v];
        slots[1][warp * D + c0 + v] = acc_b[v];
      }
    }
    GN1_SYNC();
    for (int c = tid; c < D; c += kThreads) {
      A s = A(0), b = A(0);
      for (int w = 0; w < kWarps; ++w) {
        s += slots[0][w * D + c];
        b += slots[1][w * D + c];
      }
      sums[0][c] = s;
      sums[1][c] = b;
    }
  } else {
    // Pack i is channel i / P's (P = L / W packs per channel). Runs of
    // seg = min(P, 32) lanes share a channel: each run's sum goes to slot
    // i / seg, and channel c's slots are c P / seg .. (c + 1) P / seg - 1.
    const int P = L / W, seg = P < 32 ? P : 32;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int i = tid + j * kThreads;
      A ps = A(0), pb = A(0);
      if (i < packs) {
        const int c = i / P;
#pragma unroll
        for (int v = 0; v < W; ++v) {
          const A dz = dz_of(j, v, c);
          ps += dz * (static_cast<A>(rx[j].v[v]) - mean);
          pb += dz;
        }
      }
      for (int m = seg / 2; m > 0; m >>= 1) {
        ps += GN1_SHFL_XOR(ps, m);
        pb += GN1_SHFL_XOR(pb, m);
      }
      if (i < packs && lane % seg == 0) {
        slots[0][i / seg] = ps;
        slots[1][i / seg] = pb;
      }
    }
    GN1_SYNC();
    const int per_channel = P / seg;
    for (int c = tid; c < D; c += kThreads) {
      A s = A(0), b = A(0);
      for (int q = c * per_channel; q < (c + 1) * per_channel; ++q) {
        s += slots[0][q];
        b += slots[1][q];
      }
      sums[0][c] = s;
      sums[1][c] = b;
    }
  }
  // d scale, d shift, the float64 sums for d weight / d bias, and this
  // thread's share of the group's sums of gamma (1 + scale) DS and ... DB.
  double sa = 0.0, sb = 0.0;
  for (int c = tid; c < D; c += kThreads) {
    const int ch = g * D + c, nc = n * C + ch;
    const double DS = static_cast<double>(sums[0][c]), DB = static_cast<double>(sums[1][c]);
    const double gamma = weight ? static_cast<double>(weight[ch]) : 1.0;
    ds[nc] = DS;
    db[nc] = DB;
    if (dscale) {
      const double beta = bias ? static_cast<double>(bias[ch]) : 0.0;
      dscale[nc] = gamma * static_cast<double>(rstd) * DS + beta * DB;
      dshift[nc] = DB;
    }
    const double gk = gamma * (scale ? 1.0 + static_cast<double>(scale[nc]) : 1.0);
    sa += gk * DS;
    sb += gk * DB;
  }
  sa = block_sum(sa, scratch[0]);
  sb = block_sum(sb, scratch[1]);
  const double r = static_cast<double>(rstd), count = static_cast<double>(D) * L;
  const A c2 = static_cast<A>(-sa * r * r * r / count), c3 = static_cast<A>(-sb * r / count);
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int i = tid + j * kThreads;
    if (i < packs) {
      Pack<T, W> out;
      const int c0 = CL ? (i % per_pos) * W : i / (L / W);
#pragma unroll
      for (int v = 0; v < W; ++v) {
        const int c = CL ? c0 + v : c0;
        const A dz = dz_of(j, v, c);
        out.v[v] = static_cast<T>(coef[0][c] * dz + c2 * (static_cast<A>(rx[j].v[v]) - mean) + c3);
      }
      const int off = CL ? base + (i / per_pos) * C + (i % per_pos) * W : base + i * W;
      *reinterpret_cast<Pack<T, W>*>(dx + off) = out;
    }
  }
}

// Pack width and packs per thread for a shape, or w == 0 where this kernel
// does not apply. vec: elements of T per 16 bytes. (The caller also checks
// 16-byte alignment of x and y and that N * G fills the GPU.)
struct Plan {
  int w = 0;
  int k = 0;
};

inline Plan plan(int64_t N, int64_t G, int64_t D, int64_t L, bool channels_last, int vec) {
  Plan p;
  const int64_t numel = N * G * D * L;
  if (numel <= 0 || numel >= (int64_t(1) << 31) || N * G >= (int64_t(1) << 31) || D > kThreads) return p;
  int w = vec;
  if (channels_last) {
    while (w > 2 && D % w != 0) w /= 2;
    if (D % w != 0) return p;
  } else if (L % w != 0) {
    return p;
  }
  const int64_t packs = D * L / w;
  int k = 1;
  while (int64_t(k) * kThreads < packs) k *= 2;
  if (k > kMaxPacksPerThread) return p;
  p.w = w;
  p.k = k;
  return p;
}

// forward's plan, where the backward also applies (see backward_kernel).
inline Plan backward_plan(int64_t N, int64_t G, int64_t D, int64_t L, bool channels_last, int vec) {
  Plan p = plan(N, G, D, L, channels_last, vec);
  if (p.w == 0 || p.k > kMaxBackwardPacks) return Plan{};
  const auto pow2 = [](int64_t v) { return v > 0 && (v & (v - 1)) == 0; };
  const int64_t per = channels_last ? D / p.w : L / p.w;
  const bool ok = channels_last ? pow2(per) && per <= 32 : pow2(per) || per % 32 == 0;
  return ok ? p : Plan{};
}

// Calls f.template run<W, K, CL>() for the plan (W a power of two from V
// down to 2, K in 1, 2, 4 and, when MaxK allows, 8).
template <int W, bool CL, int MaxK, typename F>
void run_k(int k, const F& f) {
  switch (k) {
    case 1: f.template run<W, 1, CL>(); break;
    case 2: f.template run<W, 2, CL>(); break;
    case 4: f.template run<W, 4, CL>(); break;
    default:
      if constexpr (MaxK >= 8) f.template run<W, 8, CL>();
      break;
  }
}

template <int W, int MaxK, typename F>
void run_channels_last(const Plan& p, const F& f) {
  if constexpr (W >= 2) {
    if (p.w == W) {
      run_k<W, true, MaxK>(p.k, f);
    } else {
      run_channels_last<W / 2, MaxK>(p, f);
    }
  }
}

// MaxK: the most packs per thread the caller's plans ask for (the backward
// keeps x and dy in registers and stops at kMaxBackwardPacks).
template <int V, int MaxK = kMaxPacksPerThread, typename F>
void dispatch(const Plan& p, bool channels_last, const F& f) {
  if (channels_last) {
    run_channels_last<V, MaxK>(p, f);
  } else {
    run_k<V, false, MaxK>(p.k, f);
  }
}

}  // namespace gn_onepass
}  // namespace iddpm_fast
