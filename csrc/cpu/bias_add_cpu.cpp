// CPU implementation of bias_add (schema in ops.cpp), composed of ATen ops:
// on the CPU a oneDNN convolution adds its bias itself, so the UNet keeps the
// stock path there; this kernel serves tests, torch.compile tracing and
// IDDPM_FAST_CONV_BIAS=fused A/B runs, with the same rounding as the CUDA one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../bias_add.h"

namespace iddpm_fast {
namespace {

at::Tensor bias_add_cpu(const at::Tensor& x_in, const at::Tensor& bias, const c10::optional<at::Tensor>& residual) {
  const char* op = "iddpm_fast::bias_add";
  TORCH_CHECK(x_in.device().is_cpu(), message(op, " (CPU kernel): x must be on the CPU, got ", x_in.device()));
  const at::Tensor x = dense(x_in);
  const at::Tensor r = check_bias_add(op, x, bias, residual);
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  at::Tensor y = at::add(x, bias.to(x.scalar_type()).view(shape));
  if (r.defined()) {
    y.add_(r);  // rounded after the bias, as (x + bias) + residual in two ops
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(iddpm_fast, CPU, m) {
  m.impl("bias_add", &bias_add_cpu);
}

}  // namespace iddpm_fast
