// Input checks shared by the CPU and CUDA implementations of bias_add
// (schema in ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "gn_silu.h"

namespace iddpm_fast {

// Checks x, bias and residual; returns the residual laid out like x (a copy
// when its layout differs), or an undefined tensor without one.
inline at::Tensor check_bias_add(const char* op, const at::Tensor& x, const at::Tensor& bias,
                                 const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() >= 2, message(op, ": x must be [N, C, ...], got shape ", x.sizes()));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, message(op,
              ": x must be float32, float64, float16 or bfloat16, got ", dt));
  TORCH_CHECK(bias.device() == x.device(), message(op, ": bias is on ", bias.device(), " but x is on ", x.device()));
  TORCH_CHECK(at::isFloatingType(bias.scalar_type()), message(op, ": bias must be a floating-point tensor, got ",
              bias.scalar_type()));
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(1), message(op, ": bias must have shape [", x.size(1),
              "] (x's channels), got ", bias.sizes()));
  if (!residual.has_value() || !residual->defined()) {
    return at::Tensor();
  }
  const at::Tensor& r = *residual;
  TORCH_CHECK(r.sizes() == x.sizes(), message(op, ": residual has shape ", r.sizes(), " but x has ", x.sizes()));
  TORCH_CHECK(r.device() == x.device() && r.scalar_type() == dt, message(op,
              ": residual must match x's device and dtype (", x.device(), ", ", dt, "), got ", r.device(), ", ",
              r.scalar_type()));
  return r.strides() == x.strides() ? r : dense_like(r, x);
}

}  // namespace iddpm_fast
