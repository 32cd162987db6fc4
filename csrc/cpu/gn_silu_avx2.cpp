// The CPU kernels compiled for AVX2/FMA (the flags of the whole extension:
// -mavx2 -mfma -mf16c -DCPU_CAPABILITY_AVX2; generic code elsewhere).
#define IDDPM_GN_NS cpu_avx2
#include "gn_silu_kernel.h"
