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

#include "vec_util.h"

#ifndef GN_ONEPASS_EMULATED
#define GN1_DEVICE __device__ __forceinline__
#define GN1_KERNEL __global__ __launch_bounds__(iddpm_fast::gn_onepass::kThreads)
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
// block_sum's second butterfly reduces the kWarps warp totals within one warp.
static_assert(kThreads % 32 == 0 && kWarps <= 32, "whole warps, at most 32 of them");
constexpr int kMaxPacksPerThread = 8;  // registers: at most 8 packs of 16 bytes per thread

// W elements of T moved as one access (W * sizeof(T) bytes: 16, or less
// where a channels-last group's channels do not fill 16 bytes): the CUDA
// kernels' vector type.
template <typename T, int W>
using Pack = cuda_vec::Vec<T, W>;

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

// The kernels' arguments (one struct, passed by value, so that a launcher
// is one line whatever runs it). Shapes: x, y, dy, dx [N, C, L] contiguous or
// [N, L, C] channels-last, fewer than 2^31 elements, 16-byte aligned;
// weight, bias [C] or null; scale, shift [N, C] or null; mean, rstd [N, G]
// (the forward writes them, the backward reads them); ds, db [N, C] and
// dscale, dshift [N, C] or null (the backward's float64 outputs).
template <typename T, typename A>
struct Args {
  const T* x;
  T* y;         // forward output
  const T* dy;  // backward input
  T* dx;        // backward output
  const A *weight, *bias, *scale, *shift;
  A *mean, *rstd;
  double *ds, *db, *dscale, *dshift;
  int G, D, L;
  A eps;
  bool act;  // SiLU after the norm (false: plain GroupNorm)
};

// Where block ng's group lies: sample n, group g, C = G D channels, its
// packs (D L / W), packs per position (channels-last) and first element
// (contiguous (n C + g D) L, channels-last n L C + g D).
struct Group {
  int n, g, C, packs, per_pos, base;
};

template <bool CL, int W>
GN1_DEVICE Group group_of(int G, int D, int L, int ng) {
  Group q;
  q.n = ng / G;
  q.g = ng - q.n * G;
  q.C = G * D;
  q.packs = D * L / W;
  q.per_pos = D / W;
  q.base = CL ? q.n * L * q.C + q.g * D : (q.n * q.C + q.g * D) * L;
  return q;
}

// Where pack i of group q starts: contiguous, a pack is W elements of one
// channel's row (L % W == 0); channels-last, W consecutive channels of one
// position (D % W == 0), per_pos = D / W packs a position.
template <bool CL, int W>
GN1_DEVICE int pack_offset(const Group& q, int i) {
  return CL ? q.base + (i / q.per_pos) * q.C + (i % q.per_pos) * W : q.base + i * W;
}

// z = (x - mean) a + b per channel: a = weight (1 + scale) rstd, b = bias
// (1 + scale) + shift (fold_coefficients in gn_silu_cuda.cu), into
// coef[0][c], coef[1][c] for the D * GPB channels of the GPB groups that
// start at group g of sample n (rstd[i]: group g + i's). The caller's
// barrier publishes them.
template <int GPB, typename T, typename A>
GN1_DEVICE void fold(const Args<T, A>& a, int n, int g, const A (&rstd)[GPB], A (*coef)[kThreads]) {
  const int C = a.G * a.D;
  for (int c = GN1_TID; c < a.D * GPB; c += kThreads) {
    A r = rstd[0];
#pragma unroll
    for (int i = 1; i < GPB; ++i) {
      if (c / a.D == i) r = rstd[i];  // the channel's group within the slab
    }
    const int ch = g * a.D + c, nc = n * C + ch;
    const A gamma = a.weight ? a.weight[ch] : A(1), beta = a.bias ? a.bias[ch] : A(0);
    const A mod = a.scale ? A(1) + a.scale[nc] : A(1), off = a.shift ? a.shift[nc] : A(0);
    coef[0][c] = gamma * r * mod;
    coef[1][c] = beta * mod + off;
  }
}

// Block (n, g) of a grid of N * G blocks, kThreads threads each. Group
// (n, g) holds channels g D .. g D + D - 1 (C = G D), M = D L elements, M / W
// packs; thread t holds packs t, t + kThreads, ... (K at most).
//
// GPB > 1 (channels-last, D * sizeof(T) under 16 bytes): the block holds a
// slab of GPB adjacent groups instead, W = GPB D channels, one 16-byte pack
// per position: half a 32-byte sector where a group's own D channels would
// be 2-8 bytes of it (at a stride of C; the sector's other half is the
// neighbouring slab's block's, likely from L2). Grid N * G / GPB; element v
// of a pack belongs to group v / D of the slab, and each group gets its own
// sums, mean and rstd.
template <typename T, typename A, int W, int K, bool CL, int GPB = 1>
GN1_KERNEL void forward_kernel(const Args<T, A> a) {
  static_assert(GPB == 1 || (CL && W % GPB == 0), "slabs: channels-last, a whole number of channels per group");
  constexpr int DG = W / GPB;  // GPB > 1: channels per group (= a.D), one pack per position
  // Each block_sum has its own scratch row: a warp still reading one row's
  // partials must not see the next sum's writes.
  GN1_SHARED A scratch[2 * GPB][kWarps];
  GN1_SHARED A coef[2][kThreads];
  const T* __restrict__ x = a.x;
  T* __restrict__ y = a.y;
  const int tid = GN1_TID;
  const int ng = GN1_BID;
  const int D = a.D * GPB, L = a.L;  // the block's channels (a slab's with GPB > 1)
  const Group grp = group_of<CL, W>(a.G / GPB, D, L, ng);
  // The sums run over x - k, k the group's first value, and k is added back
  // once: far from zero mean (|mean| / std ~ 1e4) a float32 sum of raw values
  // loses the digits that the deviations live in (as merge_vector in
  // gn_silu_cuda.cu).
  const int group_channels = GPB > 1 ? DG : a.D;
  A k[GPB], s[GPB], mean[GPB], rstd[GPB];
#pragma unroll
  for (int gi = 0; gi < GPB; ++gi) {
    k[gi] = static_cast<A>(x[grp.base + gi * group_channels]);
    s[gi] = A(0);
  }
  Pack<T, W> r[K];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int i = tid + j * kThreads;
    if (i < grp.packs) {
      r[j] = *reinterpret_cast<const Pack<T, W>*>(x + pack_offset<CL, W>(grp, i));
#pragma unroll
      for (int v = 0; v < W; ++v) s[v / DG % GPB] += static_cast<A>(r[j].v[v]) - k[v / DG % GPB];
    }
  }
  const A count = static_cast<A>(group_channels * L);  // elements per group
#pragma unroll
  for (int gi = 0; gi < GPB; ++gi) mean[gi] = k[gi] + block_sum(s[gi], scratch[gi]) / count;
  A q[GPB];
#pragma unroll
  for (int gi = 0; gi < GPB; ++gi) q[gi] = A(0);
#pragma unroll
  for (int j = 0; j < K; ++j) {
    if (tid + j * kThreads < grp.packs) {
#pragma unroll
      for (int v = 0; v < W; ++v) {
        const A d = static_cast<A>(r[j].v[v]) - mean[v / DG % GPB];
        q[v / DG % GPB] += d * d;
      }
    }
  }
#pragma unroll
  for (int gi = 0; gi < GPB; ++gi) {
    rstd[gi] = A(1) / GN1_SQRT(block_sum(q[gi], scratch[GPB + gi]) / count + a.eps);
    if (tid == 0) {
      a.mean[ng * GPB + gi] = mean[gi];
      a.rstd[ng * GPB + gi] = rstd[gi];
    }
  }
  fold<GPB>(a, grp.n, grp.g * GPB, rstd, coef);
  GN1_SYNC();
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int i = tid + j * kThreads;
    if (i < grp.packs) {
      Pack<T, W> out;
      // First channel (within the block's) of the pack's elements: in
      // channels-last consecutive elements are consecutive channels, in the
      // contiguous layout they share one.
      const int c0 = CL ? (i % grp.per_pos) * W : i * W / L;
#pragma unroll
      for (int v = 0; v < W; ++v) {
        const int c = CL ? c0 + v : c0;
        // With slabs (one pack per position) element v is channel v: group v / DG.
        const A z = (static_cast<A>(r[j].v[v]) - mean[v / DG % GPB]) * coef[0][c] + coef[1][c];
        out.v[v] = static_cast<T>(a.act ? z * (A(1) / (A(1) + GN1_EXP(-z))) : z);
      }
      *reinterpret_cast<Pack<T, W>*>(y + pack_offset<CL, W>(grp, i)) = out;
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
// thread; contiguous, a channel's L / W packs are a power of two or a
// multiple of 32 (so a warp's lanes split into aligned runs of one channel);
// channels-last, a position's D / W packs are a power of two of at most 32
// (so a thread meets the same W channels in all its packs).
constexpr int kMaxBackwardPacks = 4;  // packs of x and of dy per thread: 8 would cost occupancy
// Partial sums per layout: contiguous, one per run of lanes, at most
// kThreads * kMaxBackwardPacks (runs of one lane); channels-last, one per
// (warp, channel), kWarps * D with D up to kThreads.
constexpr int kMaxSlots =
    kThreads * kMaxBackwardPacks > kWarps * kThreads ? kThreads * kMaxBackwardPacks : kWarps * kThreads;

template <typename T, typename A, int W, int K, bool CL>
GN1_KERNEL void backward_kernel(const Args<T, A> a) {
  GN1_SHARED A coef[2][kThreads];    // a, b per channel of the group
  GN1_SHARED A slots[2][kMaxSlots];  // partial DS, DB (see below)
  GN1_SHARED A sums[2][kThreads];    // DS, DB per channel
  GN1_SHARED double scratch[2][kWarps];
  const T* __restrict__ x = a.x;
  const T* __restrict__ dy = a.dy;
  T* __restrict__ dx = a.dx;
  const int tid = GN1_TID, lane = tid % 32, warp = tid / 32;
  const int ng = GN1_BID;
  const int D = a.D, L = a.L;
  const Group grp = group_of<CL, W>(a.G, a.D, a.L, ng);
  const A mean = a.mean[ng];
  const A rstd_of[1] = {a.rstd[ng]};
  const A rstd = rstd_of[0];
  fold<1>(a, grp.n, grp.g, rstd_of, coef);
  Pack<T, W> rx[K], rg[K];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int i = tid + j * kThreads;
    if (i < grp.packs) {
      const int off = pack_offset<CL, W>(grp, i);
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
    if (!a.act) return gy;
    const A sig = A(1) / (A(1) + GN1_EXP(-z));
    return gy * sig * (A(1) + z * (A(1) - sig));
  };
  if (CL) {
    // Thread t meets channels (t % per_pos) W .. + W - 1 in every pack.
    A acc_s[W], acc_b[W];
#pragma unroll
    for (int v = 0; v < W; ++v) acc_s[v] = acc_b[v] = A(0);
    const int c0 = (tid % grp.per_pos) * W;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (tid + j * kThreads < grp.packs) {
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
      for (int m = 16; m >= grp.per_pos; m >>= 1) {
        acc_s[v] += GN1_SHFL_XOR(acc_s[v], m);
        acc_b[v] += GN1_SHFL_XOR(acc_b[v], m);
      }
    }
    if (lane < grp.per_pos) {
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
      if (i < grp.packs) {
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
      if (i < grp.packs && lane % seg == 0) {
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
    const int ch = grp.g * D + c, nc = grp.n * grp.C + ch;
    const double DS = static_cast<double>(sums[0][c]), DB = static_cast<double>(sums[1][c]);
    const double gamma = a.weight ? static_cast<double>(a.weight[ch]) : 1.0;
    a.ds[nc] = DS;
    a.db[nc] = DB;
    if (a.dscale) {
      const double beta = a.bias ? static_cast<double>(a.bias[ch]) : 0.0;
      a.dscale[nc] = gamma * static_cast<double>(rstd) * DS + beta * DB;
      a.dshift[nc] = DB;
    }
    const double gk = gamma * (a.scale ? 1.0 + static_cast<double>(a.scale[nc]) : 1.0);
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
    if (i < grp.packs) {
      Pack<T, W> out;
      const int c0 = CL ? (i % grp.per_pos) * W : i / (L / W);
#pragma unroll
      for (int v = 0; v < W; ++v) {
        const int c = CL ? c0 + v : c0;
        const A dz = dz_of(j, v, c);
        out.v[v] = static_cast<T>(coef[0][c] * dz + c2 * (static_cast<A>(rx[j].v[v]) - mean) + c3);
      }
      *reinterpret_cast<Pack<T, W>*>(dx + pack_offset<CL, W>(grp, i)) = out;
    }
  }
}

// Pack width, packs per thread and groups per block for a shape, or w == 0
// where these kernels do not apply. vec: elements of T per 16 bytes. (The caller also checks
// 16-byte alignment of x and y and that N * G / gpb blocks fill the GPU.)
struct Plan {
  int w = 0;
  int k = 0;
  int gpb = 1;  // groups per block (forward_kernel's slabs)
};

// slabs: whether the plan may put several channels-last groups in one block
// (forward_kernel only).
inline Plan plan(int64_t N, int64_t G, int64_t D, int64_t L, bool channels_last, int vec, bool slabs = true) {
  Plan p;
  const int64_t numel = N * G * D * L;
  if (numel <= 0 || numel >= (int64_t(1) << 31) || N * G >= (int64_t(1) << 31) || D > kThreads) return Plan{};
  int w = vec;
  int64_t group_elements = D * L;  // elements a block holds
  if (channels_last && slabs && D < vec && vec % D == 0 && G % (vec / D) == 0) {
    p.gpb = static_cast<int>(vec / D);  // one 16-byte pack per position holds gpb groups
    group_elements = int64_t(vec) * L;
  } else if (channels_last) {
    while (w > 2 && D % w != 0) w /= 2;
    if (D % w != 0) return Plan{};
  } else if (L % w != 0) {
    return Plan{};
  }
  const int64_t packs = group_elements / w;
  int k = 1;
  while (int64_t(k) * kThreads < packs) k *= 2;
  if (k > kMaxPacksPerThread) return Plan{};
  p.w = w;
  p.k = k;
  return p;
}

// forward's plan, where the backward also applies (see backward_kernel).
inline Plan backward_plan(int64_t N, int64_t G, int64_t D, int64_t L, bool channels_last, int vec) {
  Plan p = plan(N, G, D, L, channels_last, vec, /*slabs=*/false);
  if (p.w == 0 || p.k > kMaxBackwardPacks) return Plan{};
  const auto pow2 = [](int64_t v) { return v > 0 && (v & (v - 1)) == 0; };
  const int64_t per = channels_last ? D / p.w : L / p.w;
  const bool ok = channels_last ? pow2(per) && per <= 32 : pow2(per) || per % 32 == 0;
  return ok ? p : Plan{};
}

// Calls f.template run<W, K, CL, GPB>() for the plan (W a power of two from
// V down to 2, K in 1, 2, 4 and, when MaxK allows, 8) and returns what it
// returns; false, running nothing, for a plan no instance serves (the caller
// then takes the split kernels).
template <int W, bool CL, int MaxK, int GPB, typename F>
bool run_k(int k, const F& f) {
  switch (k) {
    case 1: return f.template run<W, 1, CL, GPB>();
    case 2: return f.template run<W, 2, CL, GPB>();
    case 4: return f.template run<W, 4, CL, GPB>();
    case 8:
      if constexpr (MaxK >= 8) return f.template run<W, 8, CL, GPB>();
      return false;
    default: return false;
  }
}

template <int W, int MaxK, typename F>
bool run_channels_last(const Plan& p, const F& f) {
  if constexpr (W >= 2) {
    return p.w == W ? run_k<W, true, MaxK, 1>(p.k, f) : run_channels_last<W / 2, MaxK>(p, f);
  } else {
    return false;
  }
}

// MaxK: the most packs per thread the caller's plans ask for (the backward
// keeps x and dy in registers and stops at kMaxBackwardPacks). Slabs (gpb
// 2, 4 or 8) exist for the forward only, with a 16-byte pack (W = V).
template <int V, int MaxK = kMaxPacksPerThread, typename F>
bool dispatch(const Plan& p, bool channels_last, const F& f) {
  if (channels_last && p.gpb > 1) {
    if (p.w != V) return false;
    switch (p.gpb) {
      case 2: return run_k<V, true, MaxK, 2>(p.k, f);
      case 4: return run_k<V, true, MaxK, 4>(p.k, f);
      case 8:
        if constexpr (V >= 8) return run_k<V, true, MaxK, 8>(p.k, f);
        return false;
      default: return false;
    }
  }
  if (channels_last) return run_channels_last<V, MaxK>(p, f);
  return p.w == V && run_k<V, false, MaxK, 1>(p.k, f);
}

// Runs launch(kernel, args) with the forward or backward kernel for a plan,
// and says whether one ran:
//   gn_onepass::run<Backward>(plan, channels_last, args, launch).
template <typename T, typename A, bool Backward, typename Launch>
struct Instance {
  const Args<T, A>& args;
  const Launch& launch;

  template <int W, int K, bool CL, int GPB>
  bool run() const {
    if constexpr (Backward) {
      if constexpr (GPB == 1) {
        launch(backward_kernel<T, A, W, K, CL>, args);
        return true;
      } else {
        return false;  // the backward has no slabs
      }
    } else {
      launch(forward_kernel<T, A, W, K, CL, GPB>, args);
      return true;
    }
  }
};

template <bool Backward, typename T, typename A, typename Launch>
bool run(const Plan& p, bool channels_last, const Args<T, A>& args, const Launch& launch) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  constexpr int MaxK = Backward ? kMaxBackwardPacks : kMaxPacksPerThread;
  return dispatch<V, MaxK>(p, channels_last, Instance<T, A, Backward, Launch>{args, launch});
}

}  // namespace gn_onepass
}  // namespace iddpm_fast
