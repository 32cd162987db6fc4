// The one-pass kernels' arguments (gn_onepass::Args) from tensors: one
// mapping for the CUDA op (gn_silu_cuda.cu) and for the CPU emulation the
// tests run (tests/cpp/gn_onepass_emulation.cpp), so that the tests cover it
// too.
#pragma once

#include <ATen/core/Tensor.h>

#include "gn_onepass.h"

namespace iddpm_fast {
namespace gn_onepass {

// x: [N, C, L] or [N, L, C] of T; weight, bias [C] and scale, shift [N, C]:
// contiguous float32 or undefined; mean, rstd [N, G] float32. The outputs
// and inputs of one direction (y; dy, dx, ds, db, dscale, dshift) and eps
// are the caller's to set.
template <typename T>
Args<T, float> args_from(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
                         const at::Tensor& rstd, int64_t G, int64_t D, int64_t L, bool act) {
  const auto ptr = [](const at::Tensor& t) -> const float* { return t.defined() ? t.data_ptr<float>() : nullptr; };
  Args<T, float> a{};
  a.x = x.data_ptr<T>();
  a.weight = ptr(weight);
  a.bias = ptr(bias);
  a.scale = ptr(scale);
  a.shift = ptr(shift);
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.G = static_cast<int>(G);
  a.D = static_cast<int>(D);
  a.L = static_cast<int>(L);
  a.act = act;
  return a;
}

}  // namespace gn_onepass
}  // namespace iddpm_fast
