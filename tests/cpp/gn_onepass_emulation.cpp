// The one-pass CUDA GroupNorm-SiLU kernels (csrc/cuda/gn_onepass.h, forward
// and backward) run on the CPU: a block's kThreads threads are OS threads,
// __syncthreads is a std::barrier, a warp shuffle an exchange through a
// buffer between two barriers, shared memory a static; the blocks run one
// after another. The kernel source is the CUDA build's, unchanged;
// tests/test_group_norm_silu_onepass.py builds this file with
// torch.utils.cpp_extension and holds the kernels to reference.py, so their
// index arithmetic, reductions and coefficients are tested where no GPU is.
// (What the emulation cannot show: speed, races between warps that a shuffle
// here would order, and faults a GPU raises on misaligned or out-of-bounds
// accesses: bench/sanitize_onepass.py runs them under compute-sanitizer.)
#include <torch/extension.h>

#include <barrier>
#include <cmath>
#include <thread>
#include <vector>

namespace gn_emu {
thread_local int block_id = 0;
thread_local int thread_id = 0;
inline std::barrier<>* block_barrier = nullptr;

// __shfl_xor_sync for a whole block calling it together (the kernel's
// reductions are called by every thread).
template <typename V>
V shfl_xor(V v, int mask) {
  static V exchange[256];
  exchange[thread_id] = v;
  block_barrier->arrive_and_wait();
  const V other = exchange[thread_id ^ mask];
  block_barrier->arrive_and_wait();
  return other;
}
}  // namespace gn_emu

#define GN_ONEPASS_EMULATED
#define GN1_DEVICE inline
#define GN1_KERNEL inline
#define GN1_SHARED static
#define GN1_TID gn_emu::thread_id
#define GN1_BID gn_emu::block_id
#define GN1_SYNC() gn_emu::block_barrier->arrive_and_wait()
#define GN1_SHFL_XOR(v, m) gn_emu::shfl_xor((v), (m))
#define GN1_EXP(z) std::exp(z)
#define GN1_SQRT(v) std::sqrt(v)
#include "gn_onepass.h"
#include "gn_onepass_args.h"

namespace {

using iddpm_fast::gn_onepass::kThreads;

at::Tensor as_float(const c10::optional<at::Tensor>& p) {
  return p.has_value() && p->defined() ? p->to(at::kFloat).contiguous() : at::Tensor();
}

// Runs kernel(args) as `blocks` blocks one after another on kThreads
// threads, which meet at a barrier between blocks (shared memory, a static
// here, is reused by the next block as on a GPU).
struct EmulatedLaunch {
  int blocks;

  template <typename Kernel, typename A>
  void operator()(Kernel kernel, const A& args) const {
    std::barrier<> barrier(kThreads);
    gn_emu::block_barrier = &barrier;
    std::vector<std::thread> threads;
    threads.reserve(kThreads);
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        gn_emu::thread_id = t;
        for (int block = 0; block < blocks; ++block) {
          gn_emu::block_id = block;
          kernel(args);
          barrier.arrive_and_wait();
        }
      });
    }
    for (auto& t : threads) t.join();
  }
};

// (pack width, packs per thread, groups per block) of the plan for x's shape and layout;
// (0, 0) where the one-pass kernel does not apply.
std::vector<int64_t> plan(const at::Tensor& x, int64_t num_groups, bool channels_last) {
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / std::max<int64_t>(N * C, 1);
  const int vec = static_cast<int>(16 / x.element_size());
  const auto p = iddpm_fast::gn_onepass::plan(N, num_groups, C / num_groups, L, channels_last, vec);
  return {p.w, p.k, p.gpb};
}

// The same for the backward kernel.
std::vector<int64_t> backward_plan(const at::Tensor& x, int64_t num_groups, bool channels_last) {
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / std::max<int64_t>(N * C, 1);
  const int vec = static_cast<int>(16 / x.element_size());
  const auto p = iddpm_fast::gn_onepass::backward_plan(N, num_groups, C / num_groups, L, channels_last, vec);
  return {p.w, p.k, p.gpb};
}

template <typename F>
void for_type(at::ScalarType type, const F& f) {
  switch (type) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<at::Half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<at::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "the one-pass kernels are built for float32, float16 and bfloat16 only");
  }
}

// The backward kernel's outputs (dx, DS, DB per (n, c) in float64, d scale,
// d shift) for x and dy in the same layout; mean, rstd from forward().
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                                 const c10::optional<at::Tensor>& shift, int64_t num_groups, bool act,
                                 bool channels_last) {
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  const int vec = static_cast<int>(16 / x.element_size());
  const auto p = iddpm_fast::gn_onepass::backward_plan(N, num_groups, C / num_groups, L, channels_last, vec);
  TORCH_CHECK(p.w != 0, "the one-pass backward does not apply to this shape");
  TORCH_CHECK(dy.strides() == x.strides() && dy.scalar_type() == x.scalar_type(), "dy must be laid out as x");
  at::Tensor dx = at::empty_like(x);
  const auto dbl = x.options().dtype(at::kDouble);
  at::Tensor ds = at::empty({N, C}, dbl), db = at::empty({N, C}, dbl);
  const bool has_scale = scale.has_value() && scale->defined();
  at::Tensor dscale = has_scale ? at::empty({N, C}, dbl) : at::Tensor();
  at::Tensor dshift = has_scale ? at::empty({N, C}, dbl) : at::Tensor();
  at::Tensor w = as_float(weight), b = as_float(bias), sc = as_float(scale), sh = as_float(shift);
  at::Tensor m = mean.to(at::kFloat).contiguous(), r = rstd.to(at::kFloat).contiguous();
  for_type(x.scalar_type(), [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    auto a = iddpm_fast::gn_onepass::args_from<T>(x, w, b, sc, sh, m, r, num_groups, C / num_groups, L, act);
    a.dy = dy.data_ptr<T>();
    a.dx = dx.data_ptr<T>();
    a.ds = ds.data_ptr<double>();
    a.db = db.data_ptr<double>();
    a.dscale = has_scale ? dscale.data_ptr<double>() : nullptr;
    a.dshift = has_scale ? dshift.data_ptr<double>() : nullptr;
    const EmulatedLaunch launch{static_cast<int>(N * num_groups)};
    const bool ran = iddpm_fast::gn_onepass::run<true>(p, channels_last, a, launch);
    TORCH_CHECK(ran, "no kernel instance serves this plan");
  });
  return {dx, ds, db, dscale, dshift};
}

// The CUDA op's forward (y, mean, rstd) through the emulated kernel; x
// contiguous or channels-last (as `channels_last` says), on the CPU.
std::vector<at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                                const c10::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool act,
                                bool channels_last) {
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  const int vec = static_cast<int>(16 / x.element_size());
  const auto p = iddpm_fast::gn_onepass::plan(N, num_groups, C / num_groups, L, channels_last, vec);
  TORCH_CHECK(p.w != 0, "the one-pass kernel does not apply to this shape");
  TORCH_CHECK(channels_last ? x.movedim(1, -1).is_contiguous() : x.is_contiguous(), "x is not in that layout");
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({N, num_groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N, num_groups}, x.options().dtype(at::kFloat));
  at::Tensor w = as_float(weight), b = as_float(bias), sc = as_float(scale), sh = as_float(shift);
  for_type(x.scalar_type(), [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    auto a = iddpm_fast::gn_onepass::args_from<T>(x, w, b, sc, sh, mean, rstd, num_groups, C / num_groups, L, act);
    a.y = y.data_ptr<T>();
    a.eps = static_cast<float>(eps);
    const EmulatedLaunch launch{static_cast<int>(N * num_groups / p.gpb)};
    const bool ran = iddpm_fast::gn_onepass::run<false>(p, channels_last, a, launch);
    TORCH_CHECK(ran, "no kernel instance serves this plan");
  });
  return {y, mean, rstd};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plan", &plan);
  m.def("forward", &forward);
  m.def("backward_plan", &backward_plan);
  m.def("backward", &backward);
}
