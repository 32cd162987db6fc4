// CPU implementation of the fused GroupNorm(-scale-shift)-SiLU ops declared in
// ops.cpp: input checks, outputs, the parameter gradients, and the choice of
// kernel build (gn_silu_kernel.h compiled for AVX-512 or AVX2) from what the
// CPU supports at run time. IDDPM_FAST_CPU_CAPABILITY=avx2 forces the AVX2
// build (tests use it to cover both).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../gn_silu.h"

namespace iddpm_fast {
namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool use_avx512() {
  const char* forced = std::getenv("IDDPM_FAST_CPU_CAPABILITY");
  if (forced != nullptr && std::strcmp(forced, "avx2") == 0) {
    return false;
  }
  static const bool ok = avx512_compiled() && cpu_has_avx512();
  return ok;
}

ElementType element_type(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return ElementType::Float;
    case at::kDouble: return ElementType::Double;
    case at::kHalf: return ElementType::Half;
    case at::kBFloat16: return ElementType::BFloat16;
    default: TORCH_CHECK(false, message("iddpm_fast: unsupported dtype ", x.scalar_type()));
  }
}

const void* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_silu_forward_cpu(const at::Tensor& x_in,
                                                                    const c10::optional<at::Tensor>& weight,
                                                                    const c10::optional<at::Tensor>& bias,
                                                                    const c10::optional<at::Tensor>& scale,
                                                                    const c10::optional<at::Tensor>& shift,
                                                                    int64_t num_groups, double eps, bool silu) {
  const char* op = "iddpm_fast::gn_silu_forward";
  GnShape s = check_inputs(op, x_in, weight, bias, scale, shift, num_groups);
  s.silu = silu;
  TORCH_CHECK(x_in.device().is_cpu(), message(op, " (CPU kernel): x must be on the CPU, got ", x_in.device()));
  at::Tensor x = dense(x_in);
  // One position per channel: [N, C, 1] is laid out as [N, 1, C], and the
  // channels-last kernels vectorise along C instead of running N * C rows of
  // one element.
  s.channels_last = stored_channels_last(x) || s.L == 1;
  const auto st = stat_type(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::zeros({s.N, s.G}, x.options().dtype(st));
  at::Tensor rstd = at::zeros({s.N, s.G}, x.options().dtype(st));
  if (x.numel() == 0) {
    return {y, mean, rstd};
  }
  at::Tensor w = as_stat(weight, st), b = as_stat(bias, st), sc = as_stat(scale, st), sh = as_stat(shift, st);
  const ElementType type = element_type(x);
  if (use_avx512()) {
    cpu_avx512::forward(type, x.const_data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), ptr(w), ptr(b),
                        ptr(sc), ptr(sh), s, eps);
  } else {
    cpu_avx2::forward(type, x.const_data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), ptr(w), ptr(b),
                      ptr(sc), ptr(sh), s, eps);
  }
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_silu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    int64_t num_groups, bool silu) {
  const char* op = "iddpm_fast::gn_silu_backward";
  GnShape s = check_inputs(op, x_in, weight, bias, scale, shift, num_groups);
  s.silu = silu;
  TORCH_CHECK(x_in.device().is_cpu(), message(op, " (CPU kernel): x must be on the CPU, got ", x_in.device()));
  check_backward_inputs(op, grad_y, x_in, mean_in, rstd_in, s);
  at::Tensor x = dense(x_in);
  s.channels_last = stored_channels_last(x) || s.L == 1;  // as in the forward
  at::Tensor dy = dense_like(grad_y, x);
  const auto st = stat_type(x);
  const bool has_scale = scale.has_value() && scale->defined();
  at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor w = as_stat(weight, st), b = as_stat(bias, st), sc = as_stat(scale, st), sh = as_stat(shift, st);
  at::Tensor dx = at::empty_like(x);
  // The kernels write every channel sum (no zero fill needed) unless there
  // is nothing to sum.
  const auto sums_options = x.options().dtype(at::kDouble);
  at::Tensor DS = x.numel() > 0 ? at::empty({s.N, s.C}, sums_options) : at::zeros({s.N, s.C}, sums_options);
  at::Tensor DB = x.numel() > 0 ? at::empty({s.N, s.C}, sums_options) : at::zeros({s.N, s.C}, sums_options);
  if (x.numel() > 0) {
    const ElementType type = element_type(x);
    if (use_avx512()) {
      cpu_avx512::backward(type, dy.const_data_ptr(), x.const_data_ptr(), dx.data_ptr(), mean.const_data_ptr(),
                           rstd.const_data_ptr(), ptr(w), ptr(b), ptr(sc), ptr(sh), s, DS.data_ptr<double>(),
                           DB.data_ptr<double>());
    } else {
      cpu_avx2::backward(type, dy.const_data_ptr(), x.const_data_ptr(), dx.data_ptr(), mean.const_data_ptr(),
                         rstd.const_data_ptr(), ptr(w), ptr(b), ptr(sc), ptr(sh), s, DS.data_ptr<double>(),
                         DB.data_ptr<double>());
    }
  }
  // Parameter gradients from the channel sums, in float64 (N x C work).
  // With xhat = (x - mean) * rstd and h = w * xhat + bias:
  //   sum(dz * xhat) = rstd * DS,  dh = dz * (1 + scale).
  // d weight and d bias: summed in float64, stored in param_grad_buffer_dtype.
  const auto grad_options = DS.options().dtype(param_grad_buffer_dtype(weight, bias));
  at::Tensor gw = at::empty({s.C}, grad_options), gb = at::empty({s.C}, grad_options);
  at::Tensor gsc = at::empty({has_scale ? s.N : 0, s.C}, DS.options()), gsh = DB;
  AT_DISPATCH_FLOATING_TYPES(gw.scalar_type(), "gn_silu_param_grads_out", [&] {
    using out_t = scalar_t;
    const double* ds = DS.data_ptr<double>();
    const double* db = DB.data_ptr<double>();
    out_t* pw = gw.data_ptr<out_t>();
    out_t* pb = gb.data_ptr<out_t>();
    double* psc = gsc.data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES(st, "gn_silu_param_grads", [&] {
      const scalar_t* pw_ = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
      const scalar_t* pb_ = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
      const scalar_t* psc_ = sc.defined() ? sc.data_ptr<scalar_t>() : nullptr;
      const scalar_t* pr = rstd.data_ptr<scalar_t>();
      // Threads take whole groups (each owns its channels' sums over n) and
      // loop group by group, without a division c / D per element: serial
      // and with that division, this N x C loop had been a quarter of the
      // backward at 4x4. Each channel's sums run over n in order, in float64.
      const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.N * s.D));
      at::parallel_for(0, s.G, grain, [&](int64_t g0, int64_t g1) {
        const int64_t c0 = g0 * s.D, nc = (g1 - g0) * s.D;
        std::vector<double> acc(2 * nc, 0.0);
        double* aw = acc.data();
        double* ab = aw + nc;
        for (int64_t n = 0; n < s.N; ++n) {
          for (int64_t g = g0; g < g1; ++g) {
            const double r = static_cast<double>(pr[n * s.G + g]);
            for (int64_t c = g * s.D; c < (g + 1) * s.D; ++c) {
              const int64_t i = n * s.C + c;
              const double dz_xhat = r * ds[i];
              const double k = psc_ ? 1.0 + static_cast<double>(psc_[i]) : 1.0;
              aw[c - c0] += k * dz_xhat;
              ab[c - c0] += k * db[i];
              if (has_scale) {
                const double gamma = pw_ ? static_cast<double>(pw_[c]) : 1.0;
                const double beta = pb_ ? static_cast<double>(pb_[c]) : 0.0;
                psc[i] = gamma * dz_xhat + beta * db[i];
              }
            }
          }
        }
        for (int64_t j = 0; j < nc; ++j) {
          pw[c0 + j] = static_cast<out_t>(aw[j]);
          pb[c0 + j] = static_cast<out_t>(ab[j]);
        }
      });
    });
  });
  return backward_outputs(dx, gw, gb, gsc, gsh, weight, bias, scale, shift);
}


// Which kernel build runs here: "avx512" or "avx2" (tests and benchmarks
// report it).
std::string cpu_kernel_isa() {
  return use_avx512() ? "avx512" : "avx2";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iddpm_fast, m) {
  m.def("cpu_kernel_isa() -> str", &cpu_kernel_isa);
}

TORCH_LIBRARY_IMPL(iddpm_fast, CPU, m) {
  m.impl("gn_silu_forward", &gn_silu_forward_cpu);
  m.impl("gn_silu_backward", &gn_silu_backward_cpu);
}

}  // namespace iddpm_fast
