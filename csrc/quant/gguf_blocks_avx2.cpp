// The GGUF block kernels for AVX2 + FMA + F16C (8 float lanes); built with
// those flags on x86 only and picked at run time (gguf_blocks.cpp).
#include "quant/gguf_blocks.h"
#include "quant/gguf_blocks_common.h"

#include <immintrin.h>
#include <vector>

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

// 2^(e-128) for every e8m0 byte: one load per block instead of the branchy
// scalar decode.
struct E8m0Table {
  float v[256];
  E8m0Table() {
    for (int e = 0; e < 256; ++e) {
      v[e] = e8m0_half(uint8_t(e));
    }
  }
};
const E8m0Table kE8m0;

// One block's 32 values (unscaled) in q[0..3] and its scale.
template <int T>
inline __m256 decode(const uint8_t* p, __m256* q) {
  if constexpr (T == kQ8_0) {
    // Sign-extending loads of 8 codes each (no shuffles); the f16 scale
    // broadcast before its conversion.
    for (int k = 0; k < 4; ++k) {
      q[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 + 8 * k))));
    }
    return _mm256_cvtph_ps(_mm_set1_epi16(short(load_u16(p))));
  } else {
    const __m128i lut =
        _mm_load_si128(reinterpret_cast<const __m128i*>(kMxfp4Values));
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 1));
    const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(qs, m));
    const __m128i hi =
        _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(qs, 4), m));
    q[0] = widen(lo);
    q[1] = widen(_mm_unpackhi_epi64(lo, lo));
    q[2] = widen(hi);
    q[3] = widen(_mm_unpackhi_epi64(hi, hi));
    return _mm256_broadcast_ss(&kE8m0.v[p[0]]);
  }
}

// MXFP4 codes as bfloat16 (the doubled e2m1 values need only a float's high
// 16 bits), split in high and low bytes for two byte shuffles.
struct Mxfp4Bf16 {
  alignas(16) uint8_t hi[16];
  alignas(16) uint8_t lo[16];
  Mxfp4Bf16() {
    for (int i = 0; i < 16; ++i) {
      const float f = float(kMxfp4Values[i]);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      hi[i] = uint8_t(bits >> 24);
      lo[i] = uint8_t(bits >> 16);
    }
  }
};
const Mxfp4Bf16 kMxfp4Bf16;

// decode_mxfp4_gemv leaves a block's 32 values in the order (kMxfp4Order)
//   0 2 4 6 16 18 20 22 | 1 3 5 7 17 19 21 23 | 8 10 .. 14 24 .. 30 | 9 .. 31
// and x is permuted the same way once per call, so the products pair up.
// 32 floats of x into that order: even/odd picks then 64-bit reordering.
inline void permute_mxfp4(const float* x, float* o) {
  const __m256 a = _mm256_loadu_ps(x), b = _mm256_loadu_ps(x + 8);
  const __m256 c = _mm256_loadu_ps(x + 16), e = _mm256_loadu_ps(x + 24);
  auto fix = [](__m256 v) { // 64-bit chunks 0, 2, 1, 3
    return _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(v), _MM_SHUFFLE(3, 1, 2, 0)));
  };
  _mm256_storeu_ps(o, fix(_mm256_shuffle_ps(a, c, _MM_SHUFFLE(2, 0, 2, 0))));
  _mm256_storeu_ps(o + 8,
                   fix(_mm256_shuffle_ps(a, c, _MM_SHUFFLE(3, 1, 3, 1))));
  _mm256_storeu_ps(o + 16,
                   fix(_mm256_shuffle_ps(b, e, _MM_SHUFFLE(2, 0, 2, 0))));
  _mm256_storeu_ps(o + 24,
                   fix(_mm256_shuffle_ps(b, e, _MM_SHUFFLE(3, 1, 3, 1))));
}

// An MXFP4 block for the GEMV without int->float conversions: the nibbles
// (low ones in the low lane, high ones in the high lane) pick bf16 bytes, and
// interleaving them makes the floats directly (8 shuffles' work in 4).
inline __m256 decode_mxfp4_gemv(const uint8_t* p, __m256* q) {
  const __m256i thi = _mm256_broadcastsi128_si256(
      _mm_load_si128(reinterpret_cast<const __m128i*>(kMxfp4Bf16.hi)));
  const __m256i tlo = _mm256_broadcastsi128_si256(
      _mm_load_si128(reinterpret_cast<const __m128i*>(kMxfp4Bf16.lo)));
  const __m256i qs = _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 1)));
  const __m256i idx =
      _mm256_and_si256(_mm256_srlv_epi64(qs, _mm256_set_epi64x(4, 4, 0, 0)),
                       _mm256_set1_epi8(0x0f));
  const __m256i hb = _mm256_shuffle_epi8(thi, idx);
  const __m256i lb = _mm256_shuffle_epi8(tlo, idx);
  const __m256i w0 = _mm256_unpacklo_epi8(lb, hb); // values 0-7 | 16-23
  const __m256i w1 = _mm256_unpackhi_epi8(lb, hb); // values 8-15 | 24-31
  const __m256i high = _mm256_set1_epi32(int(0xffff0000u));
  q[0] = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
  q[1] = _mm256_castsi256_ps(_mm256_and_si256(w0, high));
  q[2] = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
  q[3] = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
  return _mm256_broadcast_ss(&kE8m0.v[p[0]]);
}

// A block as the GEMV reads it: Q8_0 in order, MXFP4 in the permuted order.
template <int T>
inline __m256 decode_gemv(const uint8_t* p, __m256* q) {
  if constexpr (T == kQ8_0) {
    return decode<kQ8_0>(p, q);
  } else {
    return decode_mxfp4_gemv(p, q);
  }
}

// One block of one weight row against one x row, added to acc. Every path
// (any number of weight or x rows at once) uses exactly this arithmetic, so a
// row of x gets bit-identical results alone or among others.
inline __m256
block_dot(const __m256* q, __m256 d, const float* xb, __m256 acc) {
  __m256 s0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
  __m256 s1 = _mm256_mul_ps(q[1], _mm256_loadu_ps(xb + 8));
  s0 = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), s0);
  s1 = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), s1);
  return _mm256_fmadd_ps(d, _mm256_add_ps(s0, s1), acc);
}

// One weight row times NX rows of x: each block is decoded once for all x
// rows; even and odd blocks go to two accumulators (two dependency chains even
// for one x row) while the row is still read as one sequential stream.
template <int T, int NX>
void rows_dot(const uint8_t* row,
              int64_t blocks,
              const float* const* x,
              float* const* y,
              int64_t n) {
  constexpr int bs = T == kQ8_0 ? 34 : 17;
  __m256 acc0[NX], acc1[NX];
  for (int r = 0; r < NX; ++r) {
    acc0[r] = _mm256_setzero_ps();
    acc1[r] = _mm256_setzero_ps();
  }
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    __m256 q[4];
    __m256 d = decode_gemv<T>(row + b * bs, q);
    for (int r = 0; r < NX; ++r) {
      acc0[r] = block_dot(q, d, x[r] + b * 32, acc0[r]);
    }
    d = decode_gemv<T>(row + (b + 1) * bs, q);
    for (int r = 0; r < NX; ++r) {
      acc1[r] = block_dot(q, d, x[r] + (b + 1) * 32, acc1[r]);
    }
  }
  if (b < blocks) {
    __m256 q[4];
    const __m256 d = decode_gemv<T>(row + b * bs, q);
    for (int r = 0; r < NX; ++r) {
      acc0[r] = block_dot(q, d, x[r] + b * 32, acc0[r]);
    }
  }
  for (int r = 0; r < NX; ++r) {
    y[r][n] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
  }
}

// Rows [n0, n1) of w against the x rows [0, nx), x in groups of up to 4.
template <int T>
void gemv_t(const uint8_t* w,
            int64_t row_bytes,
            const float* const* x,
            int nx,
            float* const* y,
            int64_t n0,
            int64_t n1) {
  const int64_t blocks = row_bytes / (T == kQ8_0 ? 34 : 17);
  if constexpr (T == kMxfp4) { // x in the order the blocks decode to
    thread_local std::vector<float> buf;
    thread_local std::vector<const float*> ptrs;
    buf.resize(size_t(nx) * blocks * 32);
    ptrs.resize(nx);
    for (int r = 0; r < nx; ++r) {
      float* o = buf.data() + size_t(r) * blocks * 32;
      for (int64_t b = 0; b < blocks; ++b) {
        permute_mxfp4(x[r] + b * 32, o + b * 32);
      }
      ptrs[r] = o;
    }
    x = ptrs.data();
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    int r = 0;
    for (; r + 4 <= nx; r += 4) {
      rows_dot<T, 4>(row, blocks, x + r, y + r, n);
    }
    switch (nx - r) {
    case 3:
      rows_dot<T, 3>(row, blocks, x + r, y + r, n);
      break;
    case 2:
      rows_dot<T, 2>(row, blocks, x + r, y + r, n);
      break;
    case 1:
      rows_dot<T, 1>(row, blocks, x + r, y + r, n);
      break;
    default:
      break;
    }
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
  if (type == kQ8_0) {
    gemv_t<kQ8_0>(w, row_bytes, x, nx, y, n0, n1);
  } else {
    gemv_t<kMxfp4>(w, row_bytes, x, nx, y, n0, n1);
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
      const __m256 d = type == kQ8_0 ? decode<kQ8_0>(row + b * bs, q)
                                     : decode<kMxfp4>(row + b * bs, q);
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
