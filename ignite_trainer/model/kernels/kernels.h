// What the CPU kernels share: 8-lane float vectors (GCC vector extensions: AVX2 where the build enables it,
// two SSE halves otherwise), their loads and stores, and the kernels' entry points for the Python binding.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v8b __attribute__((vector_size(8)));

inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline v8f load(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8f select(v8i mask, v8f a, v8f b) { return mask ? a : b; }
inline v8i load_index(const uint8_t* p) { v8b v; std::memcpy(&v, p, sizeof v); return __builtin_convertvector(v, v8i); }
inline void store_index(uint8_t* p, v8i v) { v8b b = __builtin_convertvector(v, v8b); std::memcpy(p, &b, sizeof b); }

// bn_gelu_pool.cpp: BatchNorm -> GELU -> max-pool
torch::Tensor batch_stats(const torch::Tensor& y);
std::vector<torch::Tensor> forward(const torch::Tensor& y, const torch::Tensor& scale, const torch::Tensor& shift,
                                   int64_t ph, int64_t pw, bool with_index);
std::vector<torch::Tensor> backward_pooled(const torch::Tensor& grad_out, const torch::Tensor& y,
                                           const torch::Tensor& index, const torch::Tensor& scale,
                                           const torch::Tensor& shift, int64_t ph, int64_t pw);
torch::Tensor backward_input(const torch::Tensor& y, const torch::Tensor& dz, const torch::Tensor& index,
                             const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& d, int64_t ph,
                             int64_t pw);
