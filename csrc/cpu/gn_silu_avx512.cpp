// The CPU kernels compiled for AVX-512 (16-lane Vectorized<float>), used when
// the CPU has AVX-512 F/BW/VL/DQ. The AVX-512 target is given to this file's
// functions only: every header the vec headers pull in that other files also
// use (c10 types, casts, math) is included first, with the extension's
// normal flags, so their inline functions are not compiled for AVX-512 here;
// the vec headers themselves live in their own inline namespace
// at::vec::AVX512. (GCC only: clang ignores `#pragma GCC target`, so there
// this file compiles the AVX2 code again and the AVX-512 path is off.)
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <complex>
#include <iostream>

#include "../gn_silu_shape.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
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
// Not x86-64 with GCC: cpu_avx512 is the AVX2 / generic code again.
#define IDDPM_GN_NS cpu_avx512
#include "gn_silu_kernel.h"

namespace iddpm_fast {
bool avx512_compiled() {
  return false;
}
}  // namespace iddpm_fast
#endif
