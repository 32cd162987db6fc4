// CPU dropout that draws exactly the mask torch's own CPU dropout draws.
//
// F.dropout on a CPU tensor (what improved-diffusion's nn.Dropout runs) is
//   noise = empty_like(x).bernoulli_(1 - p); noise.div_(1 - p); y = x * noise
// and bernoulli_ fills `noise` one element at a time, in memory order, from
// the CPU generator (a 32-bit Mersenne Twister): per element two words
// r1, r2 make the 53-bit integer ((r1 << 32) | r2) mod 2^53, u = that / 2^53,
// and the element is kept when u < 1 - p. That serial path costs ~5 ns per
// element, 9% of a bf16 training step of the 32x32 UNet on this CPU.
//
// Here the same words come from a copy of the generator's state, with the
// Twister's regeneration and tempering written as plain loops the compiler
// vectorises, fused with the scaling: y = x * (keep ? v : 0) with
// v = 1 / (1 - p) rounded to x's dtype as noise.div_ rounds it (the caller
// passes v). The state is written back afterwards, so the generator ends
// exactly where bernoulli_ would have left it: the masks, the outputs and
// every later random draw are the ones stock PyTorch gives. The Python side
// checks once, against bernoulli_ itself, that this holds for the torch it
// runs on (an MKL-backed bernoulli_ would draw differently) and otherwise
// keeps F.dropout.
//
// The mask is returned (one byte per element, x's layout) for the backward,
// dx = dy * (keep ? v : 0), which is what autograd computes for x * noise.
// Values are bit-identical to stock, signed zeros and infinities included;
// a NaN stays NaN, but in bfloat16 its bit pattern may differ (ATen's vector
// and scalar conversions write different NaN payloads, and this loop splits
// vector and tail work elsewhere than TensorIterator does).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "../gn_silu.h"

namespace iddpm_fast {
namespace {

constexpr int kStateN = 624;  // at::mt19937: MERSENNE_STATE_N
constexpr int kStateM = 397;  // MERSENNE_STATE_M
constexpr int64_t kChunk = 1024;  // elements per batch of words (8 KiB of words)

inline uint32_t twist(uint32_t u, uint32_t v) {
  // (mix(u, v) >> 1) ^ (v odd ? MATRIX_A : 0), branch-free so it vectorises.
  return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((0u - (v & 1u)) & 0x9908b0dfu);
}

// The engine's next_state(): the same recurrence, in loops without a
// loop-carried dependence shorter than the vector width.
void regenerate(uint32_t* s) {
  int i = 0;
  for (; i < kStateN - kStateM; ++i) {
    s[i] = s[i + kStateM] ^ twist(s[i], s[i + 1]);
  }
  for (; i < kStateN - 1; ++i) {
    s[i] = s[i + kStateM - kStateN] ^ twist(s[i], s[i + 1]);
  }
  s[kStateN - 1] = s[kStateM - 1] ^ twist(s[kStateN - 1], s[0]);
}

inline uint32_t temper(uint32_t y) {
  y ^= (y >> 11);
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= (y >> 18);
  return y;
}

// The words the engine would return next, in order. left_/next_ follow the
// engine's bookkeeping: a call first decrements left_ and regenerates when it
// reaches 0, so left_ - 1 words are ready at state_[next_].
void next_words(at::mt19937_data_pod& d, uint32_t* out, int64_t count) {
  while (count > 0) {
    if (d.left_ <= 1) {
      regenerate(d.state_.data());
      d.left_ = kStateN + 1;
      d.next_ = 0;
    }
    const int64_t k = std::min<int64_t>(count, d.left_ - 1);
    const uint32_t* src = d.state_.data() + d.next_;
    for (int64_t i = 0; i < k; ++i) {
      out[i] = temper(src[i]);
    }
    d.next_ += static_cast<uint32_t>(k);
    d.left_ -= static_cast<int>(k);
    out += k;
    count -= k;
  }
}

// mask[i] = (the i-th draw is kept) for n draws: the 53-bit integer
// ((r1 & (2^21 - 1)) << 32) | r2 of the next two words is below the
// threshold, compared as two 32-bit halves (vectorises better).
void draw_mask(at::mt19937_data_pod& d, bool* mask, int64_t n, uint64_t threshold) {
  uint32_t words[2 * kChunk];
  const uint32_t t_hi = static_cast<uint32_t>(threshold >> 32);
  const uint32_t t_lo = static_cast<uint32_t>(threshold);
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t m = std::min(kChunk, n - start);
    next_words(d, words, 2 * m);
    bool* out = mask + start;
    for (int64_t i = 0; i < m; ++i) {
      const uint32_t hi = words[2 * i] & 0x1fffffu;
      const uint32_t lo = words[2 * i + 1];
      out[i] = (hi < t_hi) | ((hi == t_hi) & (lo < t_lo));
    }
  }
}

// out[i] = in[i] * (mask[i] ? v : 0), rounded once to T: what x * noise
// (and autograd's grad * noise) computes, noise being v or 0 in T.
// The multipliers mask[0:kV] ? v : +0 as a vector, selected through the
// bits (branch-free, the mask being random; not mask * v, which is NaN for a
// dropped element when v is inf: 1 / (1 - p) overflows float16 for p above
// ~0.99998).
inline at::vec::Vectorized<float> mask_vector(const bool* mask, float v) {
  uint32_t v_bits;
  std::memcpy(&v_bits, &v, sizeof v_bits);
  alignas(64) uint32_t m[at::vec::Vectorized<float>::size()];
  for (int64_t j = 0; j < at::vec::Vectorized<float>::size(); ++j) {
    m[j] = (0u - static_cast<uint32_t>(mask[j])) & v_bits;
  }
  return at::vec::Vectorized<float>::loadu(m);
}

template <typename T>
void apply_mask(const T* in, const bool* mask, T* out, int64_t n, double scale) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kV = Vec::size();
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    if constexpr (std::is_same_v<T, double>) {
      const double v = scale;  // finite: 1 / (1 - p) <= 2^53 for p < 1
      for (; i < end; ++i) {
        out[i] = in[i] * (static_cast<double>(mask[i]) * v);
      }
    } else {
      // In float (half precision: converted with ATen's vectorised
      // conversions, the ones its own mul rounds with); +0 for a dropped
      // element, so x * 0 keeps its sign and NaN/inf as x * noise does.
      const float v = static_cast<float>(scale);
      for (; i + kV <= end; i += kV) {
        const Vec mv = mask_vector(mask + i, v);
        if constexpr (std::is_same_v<T, float>) {
          (Vec::loadu(in + i) * mv).store(out + i);
        } else {
          Vec x;
          at::vec::load_to_float<T>(in + i, x);
          at::vec::convert_from_float<T>(x * mv, x * mv).store(out + i, kV);
        }
      }
      for (; i < end; ++i) {
        out[i] = static_cast<T>(static_cast<float>(in[i]) * (mask[i] ? v : 0.f));
      }
    }
  });
}

// Smallest integer k with k / 2^53 >= q, i.e. a 53-bit draw r is kept
// (r / 2^53 < q) exactly when r < k.
uint64_t keep_threshold(double q) {
  const double scaled = std::ldexp(q, 53);  // exact: a power-of-two scaling
  const double up = std::ceil(scaled);
  return static_cast<uint64_t>(up);
}

void check_dropout_input(const char* op, const at::Tensor& x, double p) {
  TORCH_CHECK(x.device().is_cpu(), message(op, " (CPU kernel): x must be on the CPU, got ", x.device()));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              message(op, ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type()));
  TORCH_CHECK(x.is_non_overlapping_and_dense(),
              message(op, ": x must be stored densely (contiguous, channels-last or a permutation of them); "
                          "call .contiguous() first"));
  TORCH_CHECK(p > 0.0 && p < 1.0, message(op, ": p must be in (0, 1), got ", p));
}

std::tuple<at::Tensor, at::Tensor> dropout_forward_cpu(const at::Tensor& x, double p, double scale,
                                                       c10::optional<at::Generator> generator) {
  const char* op = "iddpm_fast::dropout_forward";
  check_dropout_input(op, x, p);
  // Same strides as x: element i of the storage gets the i-th draw, as in
  // bernoulli_ on empty_like(x).
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = at::empty_like(x, x.options().dtype(at::kBool));
  const int64_t n = x.numel();
  if (n == 0) {
    return {y, mask};
  }
  const uint64_t threshold = keep_threshold(1.0 - p);
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    at::mt19937 engine = gen->engine();
    at::mt19937_data_pod d = engine.data();
    draw_mask(d, mask.mutable_data_ptr<bool>(), n, threshold);
    engine.set_data(d);
    gen->set_engine(engine);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_forward_cpu", [&] {
    apply_mask<scalar_t>(x.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), y.mutable_data_ptr<scalar_t>(),
                         n, scale);
  });
  return {y, mask};
}

at::Tensor dropout_backward_cpu(const at::Tensor& grad_y, const at::Tensor& mask, double scale) {
  const char* op = "iddpm_fast::dropout_backward";
  TORCH_CHECK(grad_y.device().is_cpu() && mask.device().is_cpu(),
              message(op, " (CPU kernel): grad_y and mask must be on the CPU"));
  TORCH_CHECK(mask.scalar_type() == at::kBool, message(op, ": mask must be bool, got ", mask.scalar_type()));
  TORCH_CHECK(grad_y.sizes() == mask.sizes(),
              message(op, ": grad_y has shape ", grad_y.sizes(), " but the mask ", mask.sizes()));
  TORCH_CHECK(mask.is_non_overlapping_and_dense(), message(op, ": mask must be stored densely"));
  // grad_y in the mask's layout, so that both are walked in storage order.
  at::Tensor g = grad_y;
  if (grad_y.strides() != mask.strides()) {
    g = at::empty_like(mask, grad_y.options());
    g.copy_(grad_y);
  }
  at::Tensor dx = at::empty_like(mask, grad_y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dropout_backward_cpu", [&] {
    apply_mask<scalar_t>(g.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), dx.mutable_data_ptr<scalar_t>(),
                         mask.numel(), scale);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(iddpm_fast, CPU, m) {
  m.impl("dropout_forward", &dropout_forward_cpu);
  m.impl("dropout_backward", &dropout_backward_cpu);
}

}  // namespace iddpm_fast
