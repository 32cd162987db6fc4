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
  check_x(op, x);
  check_param(op, "bias", bias, x, {x.size(1)});
  if (!residual.has_value() || !residual->defined()) {
    return at::Tensor();
  }
  const at::Tensor& r = *residual;
  check_like_x(op, "residual", r, x);
  return r.strides() == x.strides() ? r : dense_like(r, x);
}

}  // namespace iddpm_fast
