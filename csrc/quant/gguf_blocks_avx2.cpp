// The GGUF block kernels for AVX2 + FMA + F16C (8 float lanes); built with
// those flags on x86 only and picked at run time (gguf_blocks.cpp).
#include "quant/gguf_blocks.h"
#include "quant/gguf_blocks_common.h"

#include <immintrin.h>

namespace mlx_harmony_core::gguf::avx2 {

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 widen(__m128i bytes8) { // low 8 int8 -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8));
}

// One block's 32 values (unscaled) in q[0..3] and its scale.
inline float decode(int type, const uint8_t* p, __m256* q) {
  if (type == kQ8_0) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 18));
    q[0] = widen(a);
    q[1] = widen(_mm_srli_si128(a, 8));
    q[2] = widen(b);
    q[3] = widen(_mm_srli_si128(b, 8));
    return _cvtsh_ss(load_u16(p));
  }
  const __m128i lut =
      _mm_load_si128(reinterpret_cast<const __m128i*>(kMxfp4Values));
  const __m128i m = _mm_set1_epi8(0x0f);
  const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 1));
  const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(qs, m));
  const __m128i hi =
      _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(qs, 4), m));
  q[0] = widen(lo);
  q[1] = widen(_mm_srli_si128(lo, 8));
  q[2] = widen(hi);
  q[3] = widen(_mm_srli_si128(hi, 8));
  return e8m0_half(p[0]);
}

// NX rows of x at once: each block is decoded once for all of them.
template <int NX>
void rows_dot(int type,
              const uint8_t* row,
              int64_t blocks,
              const float* const* x,
              float* const* y,
              int64_t n) {
  const int bs = type == kQ8_0 ? 34 : 17;
  __m256 acc[NX];
  for (int r = 0; r < NX; ++r) {
    acc[r] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < blocks; ++b) {
    __m256 q[4];
    const __m256 d = _mm256_set1_ps(decode(type, row + b * bs, q));
    for (int r = 0; r < NX; ++r) {
      const float* xb = x[r] + b * 32;
      __m256 s0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
      __m256 s1 = _mm256_mul_ps(q[1], _mm256_loadu_ps(xb + 8));
      s0 = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), s0);
      s1 = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), s1);
      acc[r] = _mm256_fmadd_ps(d, _mm256_add_ps(s0, s1), acc[r]);
    }
  }
  for (int r = 0; r < NX; ++r) {
    y[r][n] = hsum(acc[r]);
  }
}

void gemv(int type,
          const uint8_t* w,
          int64_t row_bytes,
          const float* const* x,
          int nx,
          float* const* y,
          int64_t n0,
          int64_t n1) {
  const int64_t blocks = row_bytes / (type == kQ8_0 ? 34 : 17);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    if (n + 1 < n1) { // the next row's first lines while this one computes
      _mm_prefetch(reinterpret_cast<const char*>(row + row_bytes), _MM_HINT_T0);
    }
    int r = 0;
    for (; r + 4 <= nx; r += 4) {
      rows_dot<4>(type, row, blocks, x + r, y + r, n);
    }
    switch (nx - r) {
    case 3:
      rows_dot<3>(type, row, blocks, x + r, y + r, n);
      break;
    case 2:
      rows_dot<2>(type, row, blocks, x + r, y + r, n);
      break;
    case 1:
      rows_dot<1>(type, row, blocks, x + r, y + r, n);
      break;
    default:
      break;
    }
  }
}

void dequant(int type,
             const uint8_t* w,
             int64_t row_bytes,
             int64_t r0,
             int64_t r1,
             float* out) {
  const int bs = type == kQ8_0 ? 34 : 17;
  const int64_t blocks = row_bytes / bs;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    for (int64_t b = 0; b < blocks; ++b, out += 32) {
      __m256 q[4];
      const __m256 d = _mm256_set1_ps(decode(type, row + b * bs, q));
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(out + 8 * k, _mm256_mul_ps(q[k], d));
      }
    }
  }
}

} // namespace

const BlockIsa* get() {
  static const BlockIsa isa{"avx2", gemv, dequant};
  return &isa;
}

} // namespace mlx_harmony_core::gguf::avx2
