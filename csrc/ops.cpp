// Op schemas of the iddpm_fast extension; no math here. The implementations
// register themselves per device in cpu/ and cuda/.
//
// One pair of ops covers both fused norms of the UNet:
//   y = SiLU((GroupNorm(x) * weight + bias) * (1 + scale) + shift)
// with scale/shift optional ([N, C], per sample and channel). Without them it
// is GroupNorm + SiLU (ResBlock in_layers, output head); with them it is the
// ResBlock's out_layers under use_scale_shift_norm.
#include <torch/library.h>

TORCH_LIBRARY(iddpm_fast, m) {
  // x: [N, C, *] contiguous or channels-last; weight, bias: [C] or None;
  // scale, shift: [N, C] or None. Returns y (x's dtype and layout) and the
  // per-(sample, group) mean and 1/std in float32 (float64 for float64 x),
  // saved for the backward.
  // silu=False leaves out the SiLU: a plain GroupNorm (the attention blocks').
  m.def(
      "gn_silu_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "int num_groups, float eps, bool silu=True) -> (Tensor y, Tensor mean, Tensor rstd)");
  // Gradients with respect to x, weight, bias, scale and shift. d weight and
  // d bias are [C] (weight's dtype, float32 when there is none); d scale and
  // d shift are [N, C] in scale's dtype, or empty [0] without scale/shift.
  m.def(
      "gn_silu_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, "
      "Tensor? shift, Tensor mean, Tensor rstd, int num_groups, bool silu=True) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_scale, Tensor grad_shift)");

  // A convolution's bias added after it, the way PyTorch adds it after a
  // cuDNN convolution (x + bias rounded to x's dtype), optionally followed by
  // a residual add (rounded again): y = (x + bias[c]) + residual in one pass.
  // x: [N, C, *] contiguous or channels-last; bias: [C], any float dtype
  // (cast to x's); residual: x's shape and dtype, or None. y has x's layout.
  m.def("bias_add(Tensor x, Tensor bias, Tensor? residual=None) -> Tensor");

  // Dropout drawing the same mask as F.dropout on the CPU generator (see
  // cpu/dropout_cpu.cpp): y = x * (keep ? scale : 0) with keep ~ Bernoulli(1 - p)
  // per element in memory order, scale = 1 / (1 - p) in x's dtype; returns y
  // and the keep mask (bool, x's layout). CPU only.
  // Tagged nondeterministic_seeded (it draws random numbers). AOTAutograd's
  // common-subexpression elimination in torch 2.13 spares only the aten
  // random ops it lists, so under torch.compile the Python seam calls
  // F.dropout instead of this op.
  m.def("dropout_forward(Tensor x, float p, float scale, Generator? generator=None) -> (Tensor y, Tensor mask)",
        {at::Tag::nondeterministic_seeded});
  m.def("dropout_backward(Tensor grad_y, Tensor mask, float scale) -> Tensor");
}
