// Input checks and layout handling shared by the CPU and CUDA implementations
// of the fused GroupNorm-SiLU ops (schemas in ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <type_traits>

#include "gn_silu_shape.h"

namespace iddpm_fast {

// Error messages are assembled here as one std::string (std::to_string,
// Device::str(), c10::toString) and handed to TORCH_CHECK whole, which then
// uses the string as is: no std::ostream runs inside this library. On the GPU
// machine (torch 2.11 and this library both built by GCC 13.3) streaming an
// integer from inside the extension crashed with SIGSEGV in
// std::ostream::_M_insert<long> (found with cuda-gdb), i.e. every failing
// check of a size was a crash instead of an error.
inline void append_part(std::string& out, const char* part) { out += part; }
inline void append_part(std::string& out, const std::string& part) { out += part; }
inline void append_part(std::string& out, const c10::Device& device) { out += device.str(); }
inline void append_part(std::string& out, at::ScalarType type) { out += c10::toString(type); }
inline void append_part(std::string& out, at::IntArrayRef shape) {
  out += "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  out += "]";
}
template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
inline void append_part(std::string& out, T value) {
  out += std::to_string(value);
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (append_part(out, parts), ...);
  return out;
}

// True when x is stored channels-last ([N, *spatial, C] in memory) and not
// also plain contiguous (for C == 1 or L == 1 both hold; plain wins).
inline bool stored_channels_last(const at::Tensor& x) {
  if (x.dim() < 3 || x.is_contiguous()) {
    return false;
  }
  return x.movedim(1, -1).is_contiguous();
}

// x itself when it is contiguous or channels-last, else a contiguous copy
// (strided views are computed correctly, at the price of one copy).
inline at::Tensor dense(const at::Tensor& x) {
  if (x.is_contiguous() || stored_channels_last(x)) {
    return x;
  }
  return x.contiguous();
}

// t laid out like `like` (plain or channels-last); grad_y may arrive in a
// different layout from x.
inline at::Tensor dense_like(const at::Tensor& t, const at::Tensor& like) {
  if (stored_channels_last(like)) {
    return t.movedim(1, -1).contiguous().movedim(-1, 1);
  }
  return t.contiguous();
}

inline void check_param(const char* op, const char* name, const c10::optional<at::Tensor>& p,
                        const at::Tensor& x, at::IntArrayRef shape) {
  if (!p.has_value() || !p->defined()) {
    return;
  }
  TORCH_CHECK(p->device() == x.device(), message(op, ": ", name, " is on ", p->device(), " but x is on ", x.device()));
  TORCH_CHECK(at::isFloatingType(p->scalar_type()), message(op, ": ", name, " must be a floating-point tensor, got ",
              p->scalar_type()));
  TORCH_CHECK(p->sizes() == shape, message(op, ": ", name, " must have shape ", shape, ", got ", p->sizes()));
}

// x is [N, C, ...] in one of the four float dtypes the kernels take.
inline void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, message(op, ": x must be [N, C, ...], got shape ", x.sizes()));
  auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, message(op,
              ": x must be float32, float64, float16 or bfloat16, got ", dt));
}

// t (grad_y, a residual) has x's shape, device and dtype.
inline void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), message(op, ": ", name, " has shape ", t.sizes(), " but x has ", x.sizes()));
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(), message(op, ": ", name,
              " must match x's device and dtype (", x.device(), ", ", x.scalar_type(), "), got ", t.device(), ", ",
              t.scalar_type()));
}

inline GnShape check_inputs(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                            const c10::optional<at::Tensor>& shift, int64_t num_groups) {
  check_x(op, x);
  GnShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.G = num_groups;
  TORCH_CHECK(num_groups > 0 && s.C % num_groups == 0, message(op, ": ", s.C, " channels cannot be split into ",
              num_groups, " groups"));
  s.D = s.C / num_groups;
  s.L = s.C == 0 ? 0 : (s.N == 0 ? 0 : x.numel() / (s.N * s.C));
  if (s.N == 0) {
    int64_t l = 1;
    for (int64_t d = 2; d < x.dim(); ++d) l *= x.size(d);
    s.L = l;
  }
  s.channels_last = stored_channels_last(x);
  check_param(op, "weight", weight, x, {s.C});
  check_param(op, "bias", bias, x, {s.C});
  bool has_scale = scale.has_value() && scale->defined();
  bool has_shift = shift.has_value() && shift->defined();
  TORCH_CHECK(has_scale == has_shift, message(op, ": scale and shift must be given together"));
  check_param(op, "scale", scale, x, {s.N, s.C});
  check_param(op, "shift", shift, x, {s.N, s.C});
  return s;
}

inline void check_stats(const char* op, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& x,
                        const GnShape& s) {
  auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&mean, &rstd}) {
    TORCH_CHECK(t->device() == x.device(), message(op, ": saved statistics are on ", t->device(), " but x is on ",
                x.device()));
    TORCH_CHECK(t->scalar_type() == want, message(op, ": saved statistics must be ", want, ", got ", t->scalar_type()));
    TORCH_CHECK(t->sizes() == at::IntArrayRef({s.N, s.G}), message(op, ": saved statistics must have shape [",
                s.N, ", ", s.G, "], got ", t->sizes()));
  }
}

// The backward's own inputs: grad_y like x, and the saved statistics.
inline void check_backward_inputs(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                  const at::Tensor& mean, const at::Tensor& rstd, const GnShape& s) {
  check_like_x(op, "grad_y", grad_y, x);
  check_stats(op, mean, rstd, x, s);
}

// The statistics dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType stat_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A [C] or [N, C] parameter as a contiguous tensor in the statistics dtype,
// or an undefined tensor when absent.
inline at::Tensor as_stat(const c10::optional<at::Tensor>& p, at::ScalarType dt) {
  if (!p.has_value() || !p->defined()) {
    return at::Tensor();
  }
  return p->to(dt).contiguous();
}

// The dtype of a parameter's gradient: the parameter's, float32 without one.
inline at::ScalarType param_grad_dtype(const c10::optional<at::Tensor>& p) {
  return (p.has_value() && p->defined()) ? p->scalar_type() : at::kFloat;
}

// The dtype the backwards allocate d weight and d bias in: the gradients' own
// where both are float32 or both float64 (the kernels then write them from
// their float64 sums, rounded once as the cast they replace rounded them: two
// casts and two allocations fewer per call), else float64, cast by
// backward_outputs.
inline at::ScalarType param_grad_buffer_dtype(const c10::optional<at::Tensor>& weight,
                                              const c10::optional<at::Tensor>& bias) {
  const auto dt = param_grad_dtype(weight);
  return dt == param_grad_dtype(bias) && (dt == at::kFloat || dt == at::kDouble) ? dt : at::kDouble;
}

// The backward's outputs in their dtypes from the parameter gradients (float64,
// or already in their dtypes, which .to() then returns as they are): d weight,
// d bias [C] (param_grad_dtype), d scale, d shift [N, C] (scale's dtype, or
// empty [0] without).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_outputs(
    const at::Tensor& dx, const at::Tensor& gw, const at::Tensor& gb, const at::Tensor& gsc, const at::Tensor& gsh,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift) {
  const auto wdt = param_grad_dtype(weight);
  const auto bdt = param_grad_dtype(bias);
  if (scale.has_value() && scale->defined()) {
    return {dx, gw.to(wdt), gb.to(bdt), gsc.to(scale->scalar_type()), gsh.to(shift->scalar_type())};
  }
  return {dx, gw.to(wdt), gb.to(bdt), at::empty({0}, dx.options()), at::empty({0}, dx.options())};
}

}  // namespace iddpm_fast
