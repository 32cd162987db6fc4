// 16-byte vector access shared by the CUDA kernels (gn_silu_cuda.cu,
// bias_add_cuda.cu): the vector type, its width per element type, the
// alignment test their fast paths need, and the environment switches the
// fast paths have for A/B runs.
#pragma once

#include <cstdint>
#include <cstdlib>

namespace iddpm_fast {
namespace cuda_vec {

// V elements of T loaded or stored as one 16-byte access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Elements of T per 16-byte vector.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// True when the environment variable `name` is "0": that fast path is off
// (read per call, so that one process can time both paths).
inline bool switched_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '0' && v[1] == '\0';
}

// True when the environment variable `name` is "1": that path, off by
// default, is on (read per call, as switched_off).
inline bool switched_on(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

}  // namespace cuda_vec
}  // namespace iddpm_fast
