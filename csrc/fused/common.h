// Helpers the fused CPU primitives share (defined in fused.cpp): reading
// rows of MLX arrays as floats, rounding to and storing in their dtypes.
#pragma once

#include "mlx/array.h"

#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

namespace mlx_harmony_core::fused::detail {

namespace mx = mlx::core;

bool float_like(mx::Dtype t);
bool on_cpu(const mx::Stream& s);
// Runs f(0 .. n-1), over the thread pool when `work` is large enough.
void parallel(int64_t n, int64_t work, const std::function<void(int64_t)>& f);
float sum_squares(const float* a, int64_t n);
// out[j] = exp(x[j]) for n values (out may be x), vectorized where the CPU
// allows (within a few float32 ulps of std::exp).
void exps(const float* x, int64_t n, float* out);
// n elements of a from element offset off, stride apart, as floats (a pointer
// into a itself when it holds contiguous float32 there, else into buf).
const float*
load(const mx::array& a, int64_t off, int64_t stride, int64_t n, float* buf);
// v rounded to float16 / bfloat16 t and back (v itself for any other t).
float round_to_narrow(float v, mx::Dtype t);
// v rounded to dtype t and back (what storing it as t keeps). Inline: the
// fused step calls it per element, and for float32 it is v itself.
inline float round_to(float v, mx::Dtype t) {
  return t == mx::float32 ? v : round_to_narrow(v, t);
}
// out[i] = (g[i] * sigmoid(g[i])) * u[i] for n values as mlx-lm's swiglu
// writes it, each op rounded to t; out may be g or u, scratch holds n floats.
void swiglu_rows(const float* g,
                 const float* u,
                 int64_t n,
                 mx::Dtype t,
                 float* scratch,
                 float* out);
// Stores n floats at element offset off of the (contiguous) output.
void store(const float* y, mx::array& out, int64_t off, int64_t n);
// Element offset of row r (all axes but the last) of a, in a's strides.
int64_t row_offset(const mx::array& a, int64_t r);
std::string key_of(std::initializer_list<double> values);
// The fused attention's evaluation (q, k, v in `in`, (B, H, L, hd), any
// strides; in[3] the (B, Hq, Lq, Lk) mask, bool or additive, with has_mask):
// out (B, Hq, Lq, Dv) = softmax(q k^T * scale [causal] [mask]) v.
void attend(std::vector<mx::array>& in,
            mx::array& out,
            float scale,
            bool causal,
            bool has_mask);

// One head's RoPE: its first 2 * half values rotated by the angles' (c, s)
// (traditional: adjacent pairs, else the two halves), the rest (up to n)
// copied.
inline void rotate(const float* x,
                   const float* c,
                   const float* s,
                   int half,
                   int64_t n,
                   bool traditional,
                   float* y) {
  if (traditional) {
    for (int i = 0; i < half; ++i) {
      const float x1 = x[2 * i], x2 = x[2 * i + 1];
      y[2 * i] = x1 * c[i] - x2 * s[i];
      y[2 * i + 1] = x1 * s[i] + x2 * c[i];
    }
  } else {
    for (int i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      y[i] = x1 * c[i] - x2 * s[i];
      y[i + half] = x1 * s[i] + x2 * c[i];
    }
  }
  for (int64_t i = 2 * int64_t(half); i < n; ++i) {
    y[i] = x[i];
  }
}

} // namespace mlx_harmony_core::fused::detail
