// Autograd for the extension's differentiable ops, in C++ (the Autograd
// dispatch key, every device): the forward op's outputs are saved and its
// backward op is called, as a Python torch.library.register_autograd
// formula would do, minus the Python: on small activations (the UNet's 8x8
// levels) that Python cost ~40 us per forward + backward, more than the
// kernels. torch.compile traces through these functions to the ops' fake
// kernels (registered from Python).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <utility>
#include <vector>

namespace iddpm_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

c10::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// mean and rstd leave through `stats`, not as outputs of the Function: they
// have no gradient, and marking outputs non-differentiable is unsupported by
// compiled autograd (torch._dynamo.compiled_autograd) for C++ Functions.
using Stats = std::pair<at::Tensor, at::Tensor>;

class GnSiluFunction : public torch::autograd::Function<GnSiluFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                               const c10::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool silu,
                               Stats* stats) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("iddpm_fast::gn_silu_forward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                             const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t, double,
                             bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = op.call(x, weight, bias, scale, shift, num_groups, eps, silu);
    ctx->save_for_backward({x, or_undefined(weight), or_undefined(bias), or_undefined(scale), or_undefined(shift),
                            mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["silu"] = silu;
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);
    *stats = {mean, rstd};
    return {y};
  }

  // y from differentiable ATen ops, as reference.py computes it: GroupNorm in
  // float32 (float64 for float64 x) with the parameters cast to it, the
  // result in x's dtype, then the scale/shift and the SiLU.
  static at::Tensor composite(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& scale, const at::Tensor& shift, int64_t num_groups, double eps,
                              bool silu) {
    const auto up = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const auto xu = x.to(up);
    auto cast = [&](const at::Tensor& p) { return p.defined() ? p.to(up) : p; };
    at::Tensor h = at::group_norm(xu, num_groups, cast(weight), cast(bias), eps).to(x.scalar_type());
    if (scale.defined()) {
      std::vector<int64_t> shape(scale.sizes().begin(), scale.sizes().end());
      shape.resize(x.dim(), 1);
      h = h * (scale.to(x.scalar_type()).view(shape) + 1) + shift.to(x.scalar_type()).view(shape);
    }
    return silu ? h * at::sigmoid(h) : h;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("iddpm_fast::gn_silu_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                             const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                             const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t,
                             bool)>();
    const auto saved = ctx->get_saved_variables();
    variable_list out(9);
    if (!grads[0].defined()) {
      return out;  // y unused: no gradient for anything
    }
    if (at::GradMode::is_enabled()) {
      // create_graph=True: the backward op has no derivative of its own, so
      // the gradients come from autograd through the composite forward,
      // differentiable again (gradient penalties, double backward).
      std::vector<at::Tensor> inputs;
      std::vector<int> slot;
      size_t edge = 0;
      for (int i = 0; i < 5; ++i) {
        if ((i == 0 || saved[i].defined()) && ctx->needs_input_grad(edge++)) {
          inputs.push_back(saved[i]);
          slot.push_back(i);
        }
      }
      if (inputs.empty()) {
        return out;
      }
      at::Tensor y = composite(saved[0], saved[1], saved[2], saved[3], saved[4],
                               ctx->saved_data["num_groups"].toInt(), ctx->saved_data["eps"].toDouble(),
                               ctx->saved_data["silu"].toBool());
      auto g = torch::autograd::grad({y}, inputs, {grads[0]}, /*retain_graph=*/true, /*create_graph=*/true,
                                     /*allow_unused=*/true);
      for (size_t k = 0; k < slot.size(); ++k) {
        out[slot[k]] = g[k];
      }
      return out;
    }
    auto [dx, dw, db, dsc, dsh] =
        op.call(grads[0], saved[0], as_optional(saved[1]), as_optional(saved[2]), as_optional(saved[3]),
                as_optional(saved[4]), saved[5], saved[6], ctx->saved_data["num_groups"].toInt(),
                ctx->saved_data["silu"].toBool());
    // needs_input_grad counts the inputs that are tensors: an absent
    // optional one has no entry.
    size_t edge = 0;
    auto wanted = [&](bool given) { return given && ctx->needs_input_grad(edge++); };
    const at::Tensor* grad[5] = {&dx, &dw, &db, &dsc, &dsh};
    for (int i = 0; i < 5; ++i) {
      if (wanted(i == 0 || saved[i].defined())) {
        out[i] = *grad[i];
      }
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_silu_forward_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, int64_t num_groups,
    double eps, bool silu) {
  Stats stats;
  auto out = GnSiluFunction::apply(x, weight, bias, scale, shift, num_groups, eps, silu, &stats);
  return {out[0], stats.first, stats.second};
}

// y = (x + bias) + residual: d x = d residual = d y, d bias = d y summed over
// every dim but the channels in x's dtype (at::sum accumulates bf16/fp16 in
// float32 and rounds once), then cast to bias's dtype: what autograd computes
// for stock autocast's x + bias.to(x.dtype). The backward is made of
// differentiable ATen ops, so double backward works.
class BiasAddFunction : public torch::autograd::Function<BiasAddFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias,
                               const c10::optional<at::Tensor>& residual) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("iddpm_fast::bias_add", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["bias_dtype"] = bias.scalar_type();
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    ctx->set_materialize_grads(false);
    return {op.call(x, bias, residual)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(3);
    const at::Tensor& g = grads[0];
    if (!g.defined()) {
      return out;
    }
    out[0] = g;
    if (ctx->needs_input_grad(1)) {
      std::vector<int64_t> dims;
      for (int64_t d = 0; d < g.dim(); ++d) {
        if (d != 1) dims.push_back(d);
      }
      out[1] = at::sum(g, dims).to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    if (ctx->saved_data["has_residual"].toBool()) {
      out[2] = g;
    }
    return out;
  }
};

at::Tensor bias_add_autograd(const at::Tensor& x, const at::Tensor& bias, const c10::optional<at::Tensor>& residual) {
  return BiasAddFunction::apply(x, bias, residual)[0];
}

// dropout_backward is linear in grad_y: its own gradient is itself (double
// backward, e.g. gradgradcheck).
class DropoutBackwardFunction : public torch::autograd::Function<DropoutBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& mask, double scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("iddpm_fast::dropout_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({mask});
    ctx->saved_data["scale"] = scale;
    return {op.call(grad_y, mask, scale)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor()};
    }
    return {apply(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["scale"].toDouble())[0], at::Tensor(),
            at::Tensor()};
  }
};

class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, double p, double scale,
                               const c10::optional<at::Generator>& generator) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("iddpm_fast::dropout_forward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, double,
                                                                   c10::optional<at::Generator>)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mask] = op.call(x, p, scale, generator);
    ctx->save_for_backward({mask});
    ctx->saved_data["scale"] = scale;
    // The bool mask never requires grad (no mark_non_differentiable, which
    // compiled autograd rejects for C++ Functions); no zeros for its gradient.
    ctx->set_materialize_grads(false);
    return {y, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    if (grads[0].defined()) {
      out[0] = DropoutBackwardFunction::apply(grads[0], ctx->get_saved_variables()[0],
                                              ctx->saved_data["scale"].toDouble())[0];
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> dropout_forward_autograd(const at::Tensor& x, double p, double scale,
                                                            c10::optional<at::Generator> generator) {
  auto out = DropoutFunction::apply(x, p, scale, generator);
  return {out[0], out[1]};
}

at::Tensor dropout_backward_autograd(const at::Tensor& grad_y, const at::Tensor& mask, double scale) {
  return DropoutBackwardFunction::apply(grad_y, mask, scale)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(iddpm_fast, Autograd, m) {
  m.impl("gn_silu_forward", &gn_silu_forward_autograd);
  m.impl("bias_add", &bias_add_autograd);
  m.impl("dropout_forward", &dropout_forward_autograd);
  m.impl("dropout_backward", &dropout_backward_autograd);
}

}  // namespace iddpm_fast
