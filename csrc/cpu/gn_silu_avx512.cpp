// The CPU kernels compiled for AVX-512 (16-lane Vectorized<float>), used when
// the CPU has AVX-512 F/BW/VL/DQ. Only this file's functions get the
// AVX-512 target: the ATen/c10 headers that other files also use are
// included first, with the extension's normal flags, and the vec headers
// (which this file alone includes in its AVX-512 form) live in their own
// inline namespace at::vec::AVX512, so nothing is shared with the AVX2 code.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../gn_silu_shape.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#undef CPU_CAPABILITY_AVX2
#undef CPU_CAPABILITY
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
// sleef.h declares its 16-lane functions only under __AVX512F__, which the
// target pragma does not define.
#ifndef __AVX512F__
#define __AVX512F__ 1
#define IDDPM_GN_DEFINED_AVX512F
#endif
#define IDDPM_GN_NS cpu_avx512
#include "gn_silu_kernel.h"
#ifdef IDDPM_GN_DEFINED_AVX512F
#undef __AVX512F__
#endif
#pragma GCC pop_options

namespace iddpm_fast {
bool avx512_compiled() {
  return true;
}
}  // namespace iddpm_fast
#else
// Not x86-64 with GCC/clang: cpu_avx512 is the generic code again.
#define IDDPM_GN_NS cpu_avx512
#include "gn_silu_kernel.h"

namespace iddpm_fast {
bool avx512_compiled() {
  return false;
}
}  // namespace iddpm_fast
#endif
