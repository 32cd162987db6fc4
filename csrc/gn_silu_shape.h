// Plain-data description of a GroupNorm-SiLU problem, shared by the op
// wrappers and the kernels (no ATen types, so the CPU kernels can be compiled
// for several instruction sets).
#pragma once

#include <cstdint>

namespace iddpm_fast {

// N samples, C channels in G groups of D = C / G channels, L positions (the
// product of the spatial dims).
struct GnShape {
  int64_t N, C, G, D, L;
  bool channels_last;  // memory [N, L, C] instead of [N, C, L]
  bool silu = true;    // SiLU after the norm (false: plain GroupNorm, the attention's)
};

enum class ElementType { Float, Double, Half, BFloat16 };

// Entry points of the CPU kernels, one namespace per instruction set. Pointers:
// x, y, dy, dx [N, C, L] or [N, L, C] of the element type; mean, rstd [N, G]
// and w, b [C], sc, sh [N, C] (or null) in float32 (float64 for Double);
// ds, db [N, C] float64 outputs: sum(dz * (x - mean)) and sum(dz).
#define IDDPM_GN_DECLARE(NS)                                                                                    \
  namespace NS {                                                                                                \
  int vector_width();                                                                                           \
  void forward(ElementType type, const void* x, void* y, void* mean, void* rstd, const void* w, const void* b, \
               const void* sc, const void* sh, const GnShape& s, double eps);                                  \
  void backward(ElementType type, const void* dy, const void* x, void* dx, const void* mean, const void* rstd,  \
                const void* w, const void* b, const void* sc, const void* sh, const GnShape& s, double* ds,     \
                double* db);                                                                                    \
  }

IDDPM_GN_DECLARE(cpu_avx2)
IDDPM_GN_DECLARE(cpu_avx512)

// Whether cpu_avx512 was compiled with AVX-512 (false: it is the AVX2 code).
bool avx512_compiled();

}  // namespace iddpm_fast
