// CUDA implementation of bias_add (schema in ops.cpp): y = (x + bias[c]) +
// residual in one pass, rounded as PyTorch rounds the two adds.
//
// Why: after a cuDNN convolution PyTorch adds the bias with output.add_(bias
// viewed [1, C, 1, 1]). A broadcast operand keeps TensorIterator off its
// vectorised path, and in a bf16 channels-last sampling step of the 32x32
// c128 UNet on an H200 those adds took 3.3 ms of 17 ms (an estimated ~30% of
// copy bandwidth; bench/results/h200-20261126-run4-5). Here each thread
// moves 16 bytes per access with 32-bit indices and precomputed divisors,
// and the ResBlock's residual add rides along (one pass instead of two).
//
// Fast path: fewer than 2^31 elements, 16-byte-aligned pointers, and vectors
// that never straddle a channel run (channels-last: C % V == 0, where a
// vector holds V consecutive channels of one position; contiguous: L % V ==
// 0, where it holds V positions of one channel). Anything else takes the
// per-element kernel (64-bit indices, grid-stride).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../bias_add.h"
#include "vec_util.h"

namespace iddpm_fast {
namespace {

using at::cuda::detail::IntDivider;
using cuda_vec::aligned16;
using cuda_vec::Vec;

constexpr int kThreads = 256;

// (x + b) rounded to T, then + r rounded to T: two PyTorch adds, in one.
// (b is the bias already rounded to T.)
template <typename T>
__device__ __forceinline__ T add_rounded(T x, T b, const T* r) {
  using A = at::opmath_type<T>;
  A t = static_cast<A>(x) + static_cast<A>(b);
  if (r != nullptr) {
    t = static_cast<A>(static_cast<T>(t)) + static_cast<A>(*r);
  }
  return static_cast<T>(t);
}

// The bias is read in its own dtype B (T, or float32 for a bf16/fp16 x under
// autocast, whose parameters stay float32) and rounded to T here, which is
// what bias.to(T) computes; reading it as given spares a cast kernel and an
// allocation per convolution, which in a launch-bound eager sampling step
// cost more than the fused add saved.
template <typename T, typename B>
__device__ __forceinline__ T bias_as(B b) {
  return static_cast<T>(b);
}

// One 16-byte vector of x per thread. Channels-last: vector i holds channels
// (i mod C/V) * V ... + V-1 of one position; contiguous: vector i holds V
// positions of channel (i V / L) mod C.
template <typename T, typename B, int V, bool kChannelsLast>
__global__ void bias_add_vec(const T* __restrict__ x, const B* __restrict__ bias, const T* __restrict__ res,
                             T* __restrict__ y, uint32_t nvec, IntDivider<uint32_t> div_a,
                             IntDivider<uint32_t> div_c) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= nvec) return;
  using VT = Vec<T, V>;
  const VT xv = reinterpret_cast<const VT*>(x)[i];
  VT rv;
  if (res != nullptr) rv = reinterpret_cast<const VT*>(res)[i];
  VT yv;
  if (kChannelsLast) {
    // div_a divides by C / V: the remainder is this vector's index in its row.
    // (V values of B: one 16-byte load for B == T, two for float32 bias.)
    const Vec<B, V> bv = reinterpret_cast<const Vec<B, V>*>(bias)[div_a.divmod(i).mod];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      yv.v[v] = add_rounded(xv.v[v], bias_as<T>(bv.v[v]), res != nullptr ? &rv.v[v] : nullptr);
    }
  } else {
    // div_a divides by L / V (vectors per row), div_c by C.
    const T b = bias_as<T>(bias[div_c.divmod(div_a.div(i)).mod]);
#pragma unroll
    for (int v = 0; v < V; ++v) yv.v[v] = add_rounded(xv.v[v], b, res != nullptr ? &rv.v[v] : nullptr);
  }
  reinterpret_cast<VT*>(y)[i] = yv;
}

// Every other case: element e of channel (e / inner) mod C, where inner is 1
// (channels-last) or L (contiguous).
template <typename T, typename B>
__global__ void bias_add_any(const T* __restrict__ x, const B* __restrict__ bias, const T* __restrict__ res,
                             T* __restrict__ y, int64_t numel, int64_t inner, int64_t C) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    y[e] = add_rounded(x[e], bias_as<T>(bias[(e / inner) % C]), res != nullptr ? res + e : nullptr);
  }
}

// Launches the vectorised kernel when the shape and the pointers allow it
// (a channels-last vector of bias values must be aligned to its own size),
// else the per-element one.
template <typename T, typename B>
void launch_bias_add(const at::Tensor& x, const B* bp, const at::Tensor& r, at::Tensor& y, int64_t C, int64_t L,
                     bool channels_last, cudaStream_t stream) {
  constexpr int V = cuda_vec::vec_width<T>();
  const int64_t numel = x.numel();
  const T* xp = x.const_data_ptr<T>();
  const T* rp = r.defined() ? r.const_data_ptr<T>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  const bool fits = numel <= std::numeric_limits<int32_t>::max() && (channels_last ? C % V == 0 : L % V == 0);
  const bool aligned = aligned16(xp) && aligned16(yp) && (rp == nullptr || aligned16(rp)) &&
                       (!channels_last || reinterpret_cast<uintptr_t>(bp) % sizeof(Vec<B, V>) == 0);
  // IDDPM_FAST_BIAS_ADD_CUDA_VEC=0 forces the per-element kernel (A/B runs, tests).
  if (fits && aligned && !cuda_vec::switched_off("IDDPM_FAST_BIAS_ADD_CUDA_VEC")) {
    const uint32_t nvec = static_cast<uint32_t>(numel / V);
    const unsigned blocks = static_cast<unsigned>((nvec + kThreads - 1) / kThreads);
    if (channels_last) {
      bias_add_vec<T, B, V, true><<<blocks, kThreads, 0, stream>>>(
          xp, bp, rp, yp, nvec, IntDivider<uint32_t>(static_cast<uint32_t>(C / V)), IntDivider<uint32_t>(1));
    } else {
      bias_add_vec<T, B, V, false><<<blocks, kThreads, 0, stream>>>(
          xp, bp, rp, yp, nvec, IntDivider<uint32_t>(static_cast<uint32_t>(L / V)),
          IntDivider<uint32_t>(static_cast<uint32_t>(C)));
    }
  } else {
    const int64_t want = (numel + kThreads - 1) / kThreads;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(want, 65535LL * 32));
    bias_add_any<T, B><<<blocks, kThreads, 0, stream>>>(xp, bp, rp, yp, numel, channels_last ? 1 : L, C);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor bias_add_cuda(const at::Tensor& x_in, const at::Tensor& bias_in,
                         const c10::optional<at::Tensor>& residual) {
  const char* op = "iddpm_fast::bias_add";
  TORCH_CHECK(x_in.is_cuda(), message(op, " (CUDA kernel): x must be on a CUDA device, got ", x_in.device()));
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor r = check_bias_add(op, x, bias_in, residual);
  at::Tensor y = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) {
    return y;
  }
  // The bias is read as it is when it has x's dtype or float32 (see
  // bias_as); any other dtype is cast to x's first, as the CPU kernel does.
  at::Tensor bias = bias_in.contiguous();
  const bool float_bias = bias.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat &&
                          x.scalar_type() != at::kDouble;
  if (bias.scalar_type() != x.scalar_type() && !float_bias) {
    bias = bias.to(x.scalar_type());
  }
  const int64_t C = x.size(1);
  const int64_t L = numel / (x.size(0) * C);
  const bool channels_last = stored_channels_last(x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "iddpm_fast_bias_add", [&] {
    // Only half and bfloat16 x read a float32 bias as it is (float_bias is
    // false for the others): no kernels are instantiated for float or double x.
    if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
      if (float_bias) {
        launch_bias_add<scalar_t>(x, bias.const_data_ptr<float>(), r, y, C, L, channels_last, stream);
        return;
      }
    }
    launch_bias_add<scalar_t>(x, bias.const_data_ptr<scalar_t>(), r, y, C, L, channels_last, stream);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(iddpm_fast, CUDA, m) {
  m.impl("bias_add", &bias_add_cuda);
}

}  // namespace iddpm_fast
