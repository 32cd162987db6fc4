// C++ test of the extension's ops through the dispatcher (run by
// ctest; see CMakeLists.txt): forward and backward against ATen's
// group_norm + silu with autograd in float64, both memory layouts, with and
// without scale/shift, with and without the SiLU; and bias_add with its
// gradients. Exits non-zero on the first mismatch.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>

namespace {

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const c10::optional<at::Tensor>&,
                                                               const c10::optional<at::Tensor>&,
                                                               const c10::optional<at::Tensor>&,
                                                               const c10::optional<at::Tensor>&, int64_t, double,
                                                               bool);
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t,
    bool);

int failures = 0;

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, want.abs().max().item<double>());
  const bool ok = err <= tol * scale;
  std::printf("%-55s max error %.3g %s\n", what.c_str(), err, ok ? "ok" : "FAILED");
  if (!ok) ++failures;
}

void check(const std::vector<int64_t>& shape, int64_t groups, bool channels_last, bool scale_shift, bool silu) {
  auto forward = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("iddpm_fast::gn_silu_forward", "")
                     .typed<Forward>();
  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("iddpm_fast::gn_silu_backward", "")
                      .typed<Backward>();
  torch::manual_seed(0);
  const int64_t n = shape[0], c = shape[1];
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto x = -2.3 + 0.5 * torch::randn(shape, opts);
  if (channels_last) x = x.movedim(1, -1).contiguous().movedim(-1, 1);
  auto w = torch::randn({c}, opts), b = torch::randn({c}, opts);
  auto sc = torch::randn({n, c}, opts), sh = torch::randn({n, c}, opts);
  auto dy = torch::randn(shape, opts);

  // Reference in float64 with autograd.
  auto xr = x.clone().requires_grad_(true);
  auto h = at::group_norm(xr, groups, w, b, 1e-5);
  if (scale_shift) {
    std::vector<int64_t> bshape = {n, c};
    for (size_t d = 2; d < shape.size(); ++d) bshape.push_back(1);
    h = h * (1 + sc.view(bshape)) + sh.view(bshape);
  }
  auto yr = silu ? at::silu(h) : h;
  auto gx = torch::autograd::grad({yr}, {xr}, {dy})[0];

  auto xf = x.to(at::kFloat);
  c10::optional<at::Tensor> scf, shf;
  if (scale_shift) {
    scf = sc.to(at::kFloat);
    shf = sh.to(at::kFloat);
  }
  auto [y, mean, rstd] = forward.call(xf, w.to(at::kFloat), b.to(at::kFloat), scf, shf, groups, 1e-5, silu);
  auto grads =
      backward.call(dy.to(at::kFloat), xf, w.to(at::kFloat), b.to(at::kFloat), scf, shf, mean, rstd, groups, silu);
  std::string name = "shape [";
  for (auto s : shape) name += std::to_string(s) + ",";
  name += "] G=" + std::to_string(groups) + (channels_last ? " channels-last" : "") +
          (scale_shift ? " scale-shift" : "") + (silu ? "" : " no SiLU");
  expect_close(name + " y", y, yr.detach(), 1e-5);
  expect_close(name + " dx", std::get<0>(grads), gx, 1e-4);
  if (channels_last && !y.is_contiguous() && !y.movedim(1, -1).is_contiguous()) {
    std::printf("%s: output lost the channels-last layout\n", name.c_str());
    ++failures;
  }
}

// bias_add through the dispatcher (CPU kernel and the C++ autograd): the
// values of residual + (x + bias), and the gradients d x = d residual = dy,
// d bias = dy summed over every dim but the channels.
void check_bias_add(bool channels_last) {
  using BiasAdd = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("iddpm_fast::bias_add", "").typed<BiasAdd>();
  torch::manual_seed(1);
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto x = torch::randn({2, 6, 5, 7}, opts), r = torch::randn({2, 6, 5, 7}, opts), b = torch::randn({6}, opts);
  if (channels_last) {
    x = x.contiguous(at::MemoryFormat::ChannelsLast);
    r = r.contiguous(at::MemoryFormat::ChannelsLast);
  }
  auto dy = torch::randn({2, 6, 5, 7}, opts);
  auto xg = x.clone().requires_grad_(true), rg = r.clone().requires_grad_(true), bg = b.clone().requires_grad_(true);
  auto y = op.call(xg, bg, rg);
  const std::string name = std::string("bias_add") + (channels_last ? " channels-last" : "");
  expect_close(name + " y", y.detach(), r + (x + b.view({1, 6, 1, 1})), 1e-12);
  auto grads = torch::autograd::grad({y}, {xg, bg, rg}, {dy});
  expect_close(name + " dx", grads[0], dy, 1e-12);
  expect_close(name + " dbias", grads[1], dy.sum({0, 2, 3}), 1e-12);
  expect_close(name + " dresidual", grads[2], dy, 1e-12);
}

}  // namespace

int main() {
  check_bias_add(false);
  check_bias_add(true);
  for (bool cl : {false, true}) {
    for (bool ss : {false, true}) {
      for (bool silu : {true, false}) {
        check({2, 64, 7, 9}, 32, cl, ss, silu);
        check({1, 8, 3, 3}, 8, cl, ss, silu);
        check({3, 96, 10}, 32, cl, ss, silu);
      }
    }
  }
  std::printf("%s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
