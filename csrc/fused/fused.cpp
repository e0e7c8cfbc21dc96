#include "fused/fused.h"

#include "fused/common.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "primitive/cpu_primitive.h"
#include "quant/pool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>

#if defined(MHC_HAVE_X86_KERNELS)
#include <immintrin.h>
#endif

// Hot loops built for AVX2+FMA too, picked at load time (GCC/Clang on x86).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) &&        \
    !defined(__AVX2__)
#define MHC_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define MHC_CLONES
#endif

namespace mlx_harmony_core::fused {

namespace detail {

bool float_like(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16;
}

bool on_cpu(const mx::Stream& s) {
  return s.device == mx::Device::cpu;
}

// Work (multiply-adds) from which a kernel splits over the thread pool.
constexpr int64_t kParallelWork = 1 << 16;

void parallel(int64_t n, int64_t work, const std::function<void(int64_t)>& f) {
  if (n > 1 && work >= kParallelWork) {
    quant::Pool::instance().run(n, f);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      f(i);
    }
  }
}

MHC_CLONES float dot(const float* a, const float* b, int64_t n) {
  // Eight independent partial sums: the loop vectorizes (one sum would be a
  // chain of dependent adds); the order is float32 rounding's business.
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      acc[j] += a[i + j] * b[i + j];
    }
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) +
            ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

// scores[j] = q . k_j for n keys of D floats, `stride` floats apart.
void dots_scalar(const float* q,
                 const float* k,
                 int64_t stride,
                 int64_t n,
                 int64_t D,
                 float* scores) {
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = dot(q, k + j * stride, D);
  }
}

// out[j] = exp(x[j]) for n values (x <= 0 after the max is subtracted).
void exps_scalar(const float* x, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    out[j] = std::exp(x[j]);
  }
}

#if defined(MHC_HAVE_X86_KERNELS)
#define MHC_AVX2 __attribute__((target("avx2,fma")))

MHC_AVX2 inline __m256 exp8(__m256 x) {
  // Cephes' expf: x = n ln2 + r, exp(r) by a degree-6 polynomial (~1 ulp);
  // below -87.3 (float32's smallest normal) the result is 0, as std::exp's
  // rounds to about there.
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 zero_at = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  // Past float32's largest exp: +inf, as std::exp. x as the second operand of
  // max/min so that a NaN passes through (they return the second on NaN).
  const __m256 inf_at = _mm256_cmp_ps(x, _mm256_set1_ps(88.72284f), _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.37626f), _mm256_max_ps(lo, x));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(
      x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), x);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  p = _mm256_blendv_ps(
      p, _mm256_set1_ps(std::numeric_limits<float>::infinity()), inf_at);
  return _mm256_andnot_ps(zero_at, p);
}

MHC_AVX2 void exps_avx2(const float* x, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(out + j, exp8(_mm256_loadu_ps(x + j)));
  }
  if (j < n) {
    alignas(32) float buf[8] = {};
    std::memcpy(buf, x + j, (n - j) * sizeof(float));
    _mm256_store_ps(buf, exp8(_mm256_load_ps(buf)));
    std::memcpy(out + j, buf, (n - j) * sizeof(float));
  }
}

// max(init, x[0..n)) ignoring NaNs in x, as std::max(acc, x[j]) does.
MHC_AVX2 float max_avx2(const float* x, int64_t n, float init) {
  __m256 m = _mm256_set1_ps(init);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    m = _mm256_max_ps(_mm256_loadu_ps(x + j), m); // m where x is NaN
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = init;
  for (float v : lanes) {
    r = std::max(r, v);
  }
  for (; j < n; ++j) {
    r = std::max(r, x[j]);
  }
  return r;
}

// x[j] = exp(x[j] - shift); returns their sum (eight partial sums).
MHC_AVX2 float exps_sum_avx2(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), sh));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
                ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    total += x[j];
  }
  return total;
}

// [s0 s1 s2 s3]: the sums of a0..a3's eight lanes each.
MHC_AVX2 inline __m128 sums4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h =
      _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Keys against one query (D a multiple of 8), each key's sum over D/8 FMAs
// in column order and sums4's reduction for every whole group of four from
// the first key. Eight keys a pass: eight FMA chains keep both FMA units
// busy (four left them waiting on the FMA latency).
MHC_AVX2 void dots_avx2(const float* q,
                        const float* k,
                        int64_t stride,
                        int64_t n,
                        int64_t D,
                        float* scores) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float* r = k + j * stride;
    __m256 a[8];
    for (int c = 0; c < 8; ++c) {
      a[c] = _mm256_setzero_ps();
    }
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int c = 0; c < 8; ++c) {
        a[c] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r + c * stride + d), a[c]);
      }
    }
    _mm_storeu_ps(scores + j, sums4(a[0], a[1], a[2], a[3]));
    _mm_storeu_ps(scores + j + 4, sums4(a[4], a[5], a[6], a[7]));
  }
  for (; j + 4 <= n; j += 4) {
    const float* r = k + j * stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r + d), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r + stride + d), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r + 2 * stride + d), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r + 3 * stride + d), a3);
    }
    _mm_storeu_ps(scores + j, sums4(a0, a1, a2, a3));
  }
  for (; j < n; ++j) {
    const float* kr = k + j * stride;
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kr + d), a);
    }
    const __m128 s =
        _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    scores[j] = _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
}

bool has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

#if defined(MHC_HAVE_X86_KERNELS)
// acc's columns in blocks of W (64, 32, then 8) while W fit: W / 8 FMA
// chains (eight keep both FMA units busy; a head of 64 is one block).
template <int W>
MHC_AVX2 inline int64_t weighted_block(const float* p,
                                       const float* v,
                                       int64_t stride,
                                       int64_t n,
                                       int64_t d,
                                       int64_t D,
                                       float* acc) {
  constexpr int C = W / 8;
  for (; d + W <= D; d += W) {
    __m256 a[C];
    for (int c = 0; c < C; ++c) {
      a[c] = _mm256_loadu_ps(acc + d + 8 * c);
    }
    for (int64_t j = 0; j < n; ++j) {
      if (p[j] == 0.f) {
        continue;
      }
      const __m256 pj = _mm256_set1_ps(p[j]);
      const float* r = v + j * stride + d;
      for (int c = 0; c < C; ++c) {
        a[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r + 8 * c), a[c]);
      }
    }
    for (int c = 0; c < C; ++c) {
      _mm256_storeu_ps(acc + d + 8 * c, a[c]);
    }
  }
  return d;
}

// acc (D) += sum_j p[j] * v_j over n rows v_j = v + j * stride (D a multiple
// of 8), rows with p[j] == 0 skipped, the accumulators in registers. Each
// column sums in row order with one FMA a row, as axpy's FMA clone.
MHC_AVX2 void weighted_rows_avx2(const float* p,
                                 const float* v,
                                 int64_t stride,
                                 int64_t n,
                                 int64_t D,
                                 float* acc) {
  int64_t d = weighted_block<64>(p, v, stride, n, 0, D, acc);
  d = weighted_block<32>(p, v, stride, n, d, D, acc);
  weighted_block<8>(p, v, stride, n, d, D, acc);
}

#endif

// scores[j] = q . k_j (n keys, D floats each, `stride` apart), vectorized
// where the CPU allows.
void dots(const float* q,
          const float* k,
          int64_t stride,
          int64_t n,
          int64_t D,
          float* scores) {
#if defined(MHC_HAVE_X86_KERNELS)
  if (D % 8 == 0 && has_avx2()) {
    return dots_avx2(q, k, stride, n, D, scores);
  }
#endif
  dots_scalar(q, k, stride, n, D, scores);
}

// out[j] = exp(x[j]), vectorized where the CPU allows.
void exps(const float* x, int64_t n, float* out) {
#if defined(MHC_HAVE_X86_KERNELS)
  if (has_avx2()) {
    return exps_avx2(x, n, out);
  }
#endif
  exps_scalar(x, n, out);
}

// max(init, x[0..n)), NaNs in x ignored.
float max_of(const float* x, int64_t n, float init) {
#if defined(MHC_HAVE_X86_KERNELS)
  if (has_avx2()) {
    return max_avx2(x, n, init);
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    init = std::max(init, x[j]);
  }
  return init;
}

// x[j] = exp(x[j] - shift) for n values; returns their sum.
float exps_sum(float* x, int64_t n, float shift) {
#if defined(MHC_HAVE_X86_KERNELS)
  if (has_avx2()) {
    return exps_sum_avx2(x, n, shift);
  }
#endif
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    total += x[j];
  }
  return total;
}

void swiglu_rows(const float* g,
                 const float* u,
                 int64_t n,
                 mx::Dtype t,
                 float* scratch,
                 float* out) {
  // The exponentials vectorized (a std::exp call each was ~2% of a step).
  for (int64_t i = 0; i < n; ++i) {
    scratch[i] = -g[i];
  }
  exps(scratch, n, scratch);
  for (int64_t i = 0; i < n; ++i) {
    const float sg = round_to(1.f / (1.f + scratch[i]), t);
    out[i] = round_to(round_to(g[i] * sg, t) * u[i], t);
  }
}

MHC_CLONES void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

// acc (D) += sum_j p[j] * v_j over n rows `stride` apart (p[j] == 0 skipped),
// each column in row order: vectorized where the CPU allows.
void weighted_rows(const float* p,
                   const float* v,
                   int64_t stride,
                   int64_t n,
                   int64_t D,
                   float* acc) {
#if defined(MHC_HAVE_X86_KERNELS)
  if (D % 8 == 0 && has_avx2()) {
    return weighted_rows_avx2(p, v, stride, n, D, acc);
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] != 0.f) {
      axpy(p[j], v + j * stride, acc, D);
    }
  }
}

MHC_CLONES float sum_squares(const float* a, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    s += a[i] * a[i];
  }
  return s;
}

template <class T>
void load_t(const T* p, int64_t stride, int64_t n, float* out) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<float>(p[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<float>(p[i * stride]);
    }
  }
}

// n elements of a from element offset `off`, `stride` apart, as floats.
// Returns a pointer into a itself when it holds contiguous float32 there.
const float*
load(const mx::array& a, int64_t off, int64_t stride, int64_t n, float* buf) {
  switch (a.dtype()) {
  case mx::float32:
    if (stride == 1) {
      return a.data<float>() + off;
    }
    load_t(a.data<float>() + off, stride, n, buf);
    break;
  case mx::float16:
    load_t(a.data<mx::float16_t>() + off, stride, n, buf);
    break;
  case mx::bfloat16:
    load_t(a.data<mx::bfloat16_t>() + off, stride, n, buf);
    break;
  case mx::bool_:
    load_t(a.data<bool>() + off, stride, n, buf);
    break;
  default:
    throw std::invalid_argument("[fused] unsupported dtype");
  }
  return buf;
}

// round_to's float16 / bfloat16 cases (v itself for anything else).
float round_to_narrow(float v, mx::Dtype t) {
  if (t == mx::float16) {
    return static_cast<float>(static_cast<mx::float16_t>(v));
  }
  if (t == mx::bfloat16) {
    return static_cast<float>(static_cast<mx::bfloat16_t>(v));
  }
  return v;
}

// Stores n floats at element offset off of the (contiguous) output.
void store(const float* y, mx::array& out, int64_t off, int64_t n) {
  switch (out.dtype()) {
  case mx::float32:
    std::memcpy(out.data<float>() + off, y, n * sizeof(float));
    break;
  case mx::float16: {
    auto* o = out.data<mx::float16_t>() + off;
    for (int64_t i = 0; i < n; ++i) {
      o[i] = static_cast<mx::float16_t>(y[i]);
    }
    break;
  }
  default: {
    auto* o = out.data<mx::bfloat16_t>() + off;
    for (int64_t i = 0; i < n; ++i) {
      o[i] = static_cast<mx::bfloat16_t>(y[i]);
    }
  }
  }
}

// Element offset of row r (all axes but the last) of a, in a's strides.
int64_t row_offset(const mx::array& a, int64_t r) {
  int64_t off = 0;
  for (int d = int(a.ndim()) - 2; d >= 0; --d) {
    const int64_t n = a.shape(d);
    off += (r % n) * a.strides()[d];
    r /= n;
  }
  return off;
}

std::string key_of(std::initializer_list<double> values) {
  std::ostringstream s;
  s.precision(17);
  for (double v : values) {
    s << v << ',';
  }
  return s.str();
}

} // namespace detail

namespace {

using namespace detail;

// ---- RMSNorm: inputs x[, w] ------------------------------------------------

void run_rms_norm(std::vector<mx::array>& in, mx::array& out, float eps) {
  const mx::array& x = in[0];
  const int64_t D = x.shape(-1);
  const int64_t rows = D ? int64_t(x.size()) / D : 0;
  const int64_t xs = x.strides().back();
  const mx::Dtype t = out.dtype();
  std::vector<float> wbuf(D);
  const float* w = in.size() > 1
                       ? load(in[1], 0, in[1].strides()[0], D, wbuf.data())
                       : nullptr;
  parallel(rows, rows * D, [&](int64_t r) {
    thread_local std::vector<float> buf;
    buf.resize(2 * D);
    const float* row = load(x, row_offset(x, r), xs, D, buf.data());
    float* y = buf.data() + D;
    const float n = 1.f / std::sqrt(sum_squares(row, D) / float(D) + eps);
    for (int64_t i = 0; i < D; ++i) {
      // MLX rounds x * n to the output dtype before the weight multiplies.
      y[i] = round_to(row[i] * n, t);
    }
    if (w) {
      for (int64_t i = 0; i < D; ++i) {
        y[i] *= w[i];
      }
    }
    store(y, out, r * D, D);
  });
}

// ---- RoPE: inputs x, offset[, freqs] ---------------------------------------

struct RopeSpec {
  int dims;
  bool traditional;
  float base;
  float scale;
};

void run_rope(std::vector<mx::array>& in, mx::array& out, RopeSpec sp) {
  const mx::array& x = in[0];
  const mx::array& offset = in[1];
  const int nd = x.ndim();
  const int64_t D = x.shape(-1), T = x.shape(-2);
  const int64_t rows = D ? int64_t(x.size()) / D : 0;
  const int64_t B = x.shape(0), per_batch = B ? rows / B : 0;
  const int half = sp.dims / 2;
  std::vector<float> inv(half);
  if (in.size() > 2) {
    std::vector<float> fbuf(half);
    const float* f = load(in[2],
                          0,
                          in[2].strides().empty() ? 1 : in[2].strides()[0],
                          half,
                          fbuf.data());
    for (int i = 0; i < half; ++i) {
      inv[i] = 1.f / f[i];
    }
  } else {
    const float step = std::log(sp.base) / half;
    for (int i = 0; i < half; ++i) {
      inv[i] = std::exp(float(-i) * step);
    }
  }
  std::vector<int64_t> offs(offset.size());
  for (size_t i = 0; i < offset.size(); ++i) {
    const int64_t o = offset.ndim() ? i * offset.strides()[0] : 0;
    offs[i] = offset.data<int32_t>()[o];
  }
  const int64_t xs = x.strides().back();
  const mx::Dtype t = out.dtype();
  (void)nd;
  parallel(rows, rows * D * 4, [&](int64_t r) {
    thread_local std::vector<float> buf;
    buf.resize(2 * D + 2 * half);
    const float* row = load(x, row_offset(x, r), xs, D, buf.data());
    float* y = buf.data() + D;
    float* c = y + D;
    float* s = c + half;
    const int64_t tpos = r % T;
    const int64_t b = r / per_batch;
    const float pos =
        (float(tpos) + float(offs.size() > 1 ? offs[b] : offs[0])) * sp.scale;
    for (int i = 0; i < half; ++i) {
      const float theta = pos * inv[i];
      c[i] = round_to(std::cos(theta), t);
      s[i] = round_to(std::sin(theta), t);
    }
    rotate(row, c, s, half, D, sp.traditional, y);
    store(y, out, r * D, D);
  });
}

// ---- SwiGLU: inputs gate, x (same shape) -----------------------------------

// (g * sigmoid(g)) * x as mlx-lm writes it, each op's result rounded to t;
// the exponentials 8 at a time (MLX's CPU sigmoid calls a scalar exp).
void run_swiglu(std::vector<mx::array>& in, mx::array& out) {
  const mx::array &g = in[0], &x = in[1];
  const mx::Dtype t = out.dtype();
  const int64_t n = g.ndim() ? g.shape(-1) : 1;
  const int64_t rows = n ? g.size() / n : 0;
  const int64_t gs = g.ndim() ? g.strides().back() : 1;
  const int64_t xs = x.ndim() ? x.strides().back() : 1;
  parallel(rows, rows * n * 16, [&](int64_t r) {
    thread_local std::vector<float> buf;
    buf.resize(3 * n);
    const float* gr = load(g, row_offset(g, r), gs, n, buf.data());
    const float* xr = load(x, row_offset(x, r), xs, n, buf.data() + n);
    float* e = buf.data() + 2 * n;
    swiglu_rows(gr, xr, n, t, e, e);
    store(e, out, r * n, n);
  });
}

// ---- Attention: inputs q, k, v[, mask][, sinks] ----------------------------

struct SdpaSpec {
  float scale;
  bool causal;
  bool has_mask;
  bool has_sinks;
};

// Keys per chunk of a query row's attention. Each chunk's softmax is taken
// on its own and the chunks merged (as flash decoding does), so a decode
// step's few heads split over the threads by chunk; a row's result depends on
// its own keys only (not on the query rows beside it, the batch or the
// threads), so speculation's verify rows equal plain decoding's. A multiple
// of dots' 8-key groups: each score is the same as in one pass.
constexpr int64_t kKeyChunk = 256;
// Chunk partials a call may hold for the chunks-as-tasks split (floats).
constexpr int64_t kSplitFloats = int64_t(1) << 20;

void run_sdpa(std::vector<mx::array>& in, mx::array& out, SdpaSpec sp) {
  const mx::array &q = in[0], &k = in[1], &v = in[2];
  const mx::array* mask = sp.has_mask ? &in[3] : nullptr;
  const mx::array* sinks = sp.has_sinks ? &in.back() : nullptr;
  const int64_t B = q.shape(0), Hq = q.shape(1), Lq = q.shape(2),
                D = q.shape(3);
  const int64_t Hk = k.shape(1), Lk = k.shape(2), Dv = v.shape(3);
  const int64_t rep = Hq / Hk;
  const float lowest = std::numeric_limits<float>::lowest();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const auto& qs = q.strides();
  const auto& ks = k.strides();
  const auto& vs = v.strides();
  // Keys as float32 rows of D contiguous floats: dotted straight from there.
  const float* k_rows =
      k.dtype() == mx::float32 && ks[3] == 1 ? k.data<float>() : nullptr;
  // Values likewise, summed in registers.
  const float* v_rows =
      v.dtype() == mx::float32 && vs[3] == 1 ? v.data<float>() : nullptr;
  const int64_t chunks = (Lk + kKeyChunk - 1) / kKeyChunk;
  // A task's buffers: q row, a key or value row, a row's output, a chunk's
  // scores and mask (a whole row's for the fallback in merge).
  struct Buf {
    std::vector<float> qrow, kv, o, sc, m;
  };
  auto bufs = [&]() -> Buf& {
    thread_local Buf b;
    b.qrow.resize(D);
    b.kv.resize(std::max(D, Dv));
    b.o.resize(Dv);
    b.sc.resize(std::max(kKeyChunk, Lk));
    b.m.resize(std::max(kKeyChunk, Lk));
    return b;
  };
  // Keys query row i attends (causal: up to its own position).
  auto keys_of = [&](int64_t i) {
    const int64_t last = sp.causal ? i + (Lk - Lq) : Lk - 1;
    return std::max<int64_t>(0, std::min(Lk, last + 1));
  };
  auto scaled_q = [&](int64_t b, int64_t h, int64_t i, Buf& bf) {
    const float* qr =
        load(q, b * qs[0] + h * qs[1] + i * qs[2], qs[3], D, bf.kv.data());
    for (int64_t d = 0; d < D; ++d) {
      bf.qrow[d] = qr[d] * sp.scale;
    }
  };
  // Keys [j0, j1) of row (b, h, i) (q row in bf.qrow): acc (Dv) = sum of
  // e_j * v_j, l = sum of e_j, e_j = exp(s_j - m), m the chunk's largest
  // score (masked: lowest). A chunk masked throughout gives l = 0 (NaN if a
  // score is NaN). `whole`: m = lowest over every key (what MLX's softmax
  // gives a row masked throughout: masked keys weigh alike).
  auto partial = [&](int64_t b,
                     int64_t h,
                     int64_t i,
                     int64_t j0,
                     int64_t j1,
                     bool whole,
                     Buf& bf,
                     float* acc,
                     float& m,
                     float& l) {
    const int64_t hk = h / rep;
    const int64_t kbase = b * ks[0] + hk * ks[1];
    const int64_t vbase = b * vs[0] + hk * vs[1];
    const int64_t n_keys = std::min(keys_of(i), j1) - j0;
    const int64_t n = j1 - j0;
    float* sc = bf.sc.data();
    std::fill(acc, acc + Dv, 0.f);
    if (k_rows) {
      dots(bf.qrow.data(),
           k_rows + kbase + j0 * ks[2],
           ks[2],
           std::max<int64_t>(0, n_keys),
           D,
           sc);
    } else {
      for (int64_t j = 0; j < n_keys; ++j) {
        sc[j] = dot(bf.qrow.data(),
                    load(k, kbase + (j0 + j) * ks[2], ks[3], D, bf.kv.data()),
                    D);
      }
    }
    std::fill(sc + std::max<int64_t>(0, n_keys), sc + n, lowest);
    if (mask && n_keys > 0) {
      const auto& ms = mask->strides();
      const float* mr = load(*mask,
                             b * ms[0] + h * ms[1] + i * ms[2] + j0 * ms[3],
                             ms[3],
                             n_keys,
                             bf.m.data());
      if (mask->dtype() == mx::bool_) {
        for (int64_t j = 0; j < n_keys; ++j) {
          sc[j] = mr[j] != 0.f ? sc[j] : lowest;
        }
      } else {
        for (int64_t j = 0; j < n_keys; ++j) {
          sc[j] += mr[j];
        }
      }
    }
    m = whole ? lowest : max_of(sc, n, lowest);
    if (m == lowest && !whole) {
      l = std::any_of(sc, sc + n, [](float x) { return std::isnan(x); }) ? nan
                                                                         : 0.f;
      return;
    }
    l = exps_sum(sc, n, m);
    if (v_rows) {
      weighted_rows(sc, v_rows + vbase + j0 * vs[2], vs[2], n, Dv, acc);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        if (sc[j] != 0.f) {
          axpy(sc[j],
               load(v, vbase + (j0 + j) * vs[2], vs[3], Dv, bf.kv.data()),
               acc,
               Dv);
        }
      }
    }
  };
  // Row (b, h, i)'s output from its chunks' (m, l, acc), `stride` floats
  // apart (acc at +2), merged in chunk order.
  auto merge = [&](int64_t b,
                   int64_t h,
                   int64_t i,
                   const float* part,
                   int64_t stride,
                   Buf& bf) {
    float sbuf[1];
    const float sink =
        sinks ? load(*sinks, h * sinks->strides()[0], 1, 1, sbuf)[0] : 0.f;
    float top = sinks ? sink : lowest;
    bool is_nan = false;
    for (int64_t c = 0; c < chunks; ++c) {
      top = std::max(top, part[c * stride]);
      is_nan |= std::isnan(part[c * stride + 1]);
    }
    float* o = bf.o.data();
    if (top == lowest && !is_nan) { // masked throughout, no sinks
      float m, l;
      scaled_q(b, h, i, bf);
      partial(b, h, i, 0, Lk, true, bf, o, m, l);
      for (int64_t d = 0; d < Dv; ++d) {
        o[d] /= l;
      }
    } else {
      float total = sinks ? std::exp(sink - top) : 0.f;
      std::fill(o, o + Dv, 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* pc = part + c * stride;
        if (pc[1] == 0.f) {
          continue; // masked throughout
        }
        const float f = std::exp(pc[0] - top);
        total += pc[1] * f;
        axpy(f, pc + 2, o, Dv);
      }
      const float norm = 1.f / total;
      for (int64_t d = 0; d < Dv; ++d) {
        o[d] *= norm;
      }
    }
    store(o, out, ((b * Hq + h) * Lq + i) * Dv, Dv);
  };
  const int64_t rows = B * Hq * Lq;
  const int64_t stride = Dv + 2;
  const int64_t blocks = (Lq + kQueryBlock - 1) / kQueryBlock;
  const int64_t work = B * Hq * Lq * Lk * (D + Dv);
  const int threads = quant::Pool::instance().threads();
  if (chunks > 1 && B * Hq * blocks < 8 * threads &&
      rows * chunks * stride <= kSplitFloats) {
    // Few heads (a decode step's): a task per (row block, chunk), the rows
    // merged after.
    std::vector<float> parts(rows * chunks * stride);
    parallel(B * Hq * blocks * chunks, work, [&](int64_t task) {
      const int64_t c = task % chunks, bhb = task / chunks;
      const int64_t blk = bhb % blocks, bh = bhb / blocks;
      const int64_t b = bh / Hq, h = bh % Hq;
      Buf& bf = bufs();
      const int64_t i1 = std::min(Lq, (blk + 1) * kQueryBlock);
      for (int64_t i = blk * kQueryBlock; i < i1; ++i) {
        float* pc = &parts[(((b * Hq + h) * Lq + i) * chunks + c) * stride];
        scaled_q(b, h, i, bf);
        partial(b,
                h,
                i,
                c * kKeyChunk,
                std::min(Lk, (c + 1) * kKeyChunk),
                false,
                bf,
                pc + 2,
                pc[0],
                pc[1]);
      }
    });
    parallel(rows, rows * chunks * Dv, [&](int64_t r) {
      merge(r / (Hq * Lq),
            r / Lq % Hq,
            r % Lq,
            &parts[r * chunks * stride],
            stride,
            bufs());
    });
    return;
  }
  // One task per (batch, query head, block of query rows): a block's rows
  // share the keys read; a prompt's blocks keep every thread busy. (Tasks per
  // KV head, its GQA heads reading each key once, measured slower: the heads
  // of one KV head run at once and meet in the caches.)
  parallel(B * Hq * blocks, work, [&](int64_t task) {
    const int64_t bh = task / blocks, blk = task % blocks;
    const int64_t b = bh / Hq, h = bh % Hq;
    Buf& bf = bufs();
    thread_local std::vector<float> parts;
    parts.resize(chunks * stride);
    const int64_t i1 = std::min(Lq, (blk + 1) * kQueryBlock);
    for (int64_t i = blk * kQueryBlock; i < i1; ++i) {
      scaled_q(b, h, i, bf);
      for (int64_t c = 0; c < chunks; ++c) {
        float* pc = &parts[c * stride];
        partial(b,
                h,
                i,
                c * kKeyChunk,
                std::min(Lk, (c + 1) * kKeyChunk),
                false,
                bf,
                pc + 2,
                pc[0],
                pc[1]);
      }
      merge(b, h, i, parts.data(), stride, bf);
    }
  });
}

} // namespace

void detail::attend(std::vector<mx::array>& in,
                    mx::array& out,
                    float scale,
                    bool causal,
                    bool has_mask) {
  run_sdpa(in, out, SdpaSpec{scale, causal, has_mask, false});
}

// ---- ops --------------------------------------------------------------------

mx::array rms_norm(const mx::array& x,
                   const std::optional<mx::array>& weight,
                   float eps,
                   mx::StreamOrDevice s_) {
  auto ref = mx::fast::rms_norm(x, weight, eps, s_);
  const mx::Stream s = mx::to_stream(s_);
  if (!on_cpu(s) || !float_like(x.dtype()) || !float_like(ref.dtype())) {
    return ref;
  }
  const mx::Dtype t = ref.dtype();
  std::vector<mx::array> inputs{x};
  if (weight) {
    inputs.push_back(mx::astype(*weight, t, s));
  }
  const bool has_weight = weight.has_value();
  auto fallback = [eps, has_weight, s](std::vector<mx::array> in) {
    return std::vector<mx::array>{mx::fast::rms_norm(
        in[0],
        has_weight ? std::optional<mx::array>(in[1]) : std::nullopt,
        eps,
        s)};
  };
  return mx::array(
      x.shape(),
      t,
      std::make_shared<CpuPrimitive>(
          s,
          "FusedRMSNorm",
          key_of({eps, double(has_weight)}),
          fallback,
          [eps](std::vector<mx::array>& in, std::vector<mx::array>& out) {
            run_rms_norm(in, out[0], eps);
          }),
      std::move(inputs));
}

mx::array
swiglu(const mx::array& gate, const mx::array& x, mx::StreamOrDevice s_) {
  const mx::Stream s = mx::to_stream(s_);
  auto ref_of = [s](const mx::array& g, const mx::array& u) {
    return mx::multiply(mx::multiply(g, mx::sigmoid(g, s), s), u, s);
  };
  auto ref = ref_of(gate, x);
  const mx::Dtype t = ref.dtype();
  if (!on_cpu(s) || !float_like(t) || gate.shape() != x.shape() ||
      ref.shape() != gate.shape() || gate.size() == 0) {
    return ref;
  }
  std::vector<mx::array> inputs{mx::astype(gate, t, s), mx::astype(x, t, s)};
  auto fallback = [ref_of](std::vector<mx::array> in) {
    return std::vector<mx::array>{ref_of(in[0], in[1])};
  };
  return mx::array(
      gate.shape(),
      t,
      std::make_shared<CpuPrimitive>(
          s,
          "FusedSwiGLU",
          key_of({}),
          fallback,
          [](std::vector<mx::array>& in, std::vector<mx::array>& out) {
            run_swiglu(in, out[0]);
          }),
      std::move(inputs));
}

mx::array rope(const mx::array& x,
               int dims,
               bool traditional,
               std::optional<float> base,
               float scale,
               const mx::array& offset,
               const std::optional<mx::array>& freqs,
               mx::StreamOrDevice s_) {
  // MLX's op validates the arguments (and is the result off the CPU).
  auto ref =
      mx::fast::rope(x, dims, traditional, base, scale, offset, freqs, s_);
  const mx::Stream s = mx::to_stream(s_);
  if (!on_cpu(s) || !float_like(x.dtype()) ||
      (freqs && !float_like(freqs->dtype())) || (!freqs && !base)) {
    return ref;
  }
  std::vector<mx::array> inputs{x, mx::astype(offset, mx::int32, s)};
  if (freqs) {
    inputs.push_back(*freqs);
  }
  const RopeSpec spec{dims, traditional, base.value_or(0.f), scale};
  const bool has_freqs = freqs.has_value();
  auto fallback = [spec, has_freqs, s](std::vector<mx::array> in) {
    return std::vector<mx::array>{mx::fast::rope(
        in[0],
        spec.dims,
        spec.traditional,
        has_freqs ? std::nullopt : std::optional<float>(spec.base),
        spec.scale,
        in[1],
        has_freqs ? std::optional<mx::array>(in[2]) : std::nullopt,
        s)};
  };
  return mx::array(
      x.shape(),
      x.dtype(),
      std::make_shared<CpuPrimitive>(
          s,
          "FusedRoPE",
          key_of({double(dims),
                  double(traditional),
                  spec.base,
                  scale,
                  double(has_freqs)}),
          fallback,
          [spec](std::vector<mx::array>& in, std::vector<mx::array>& out) {
            run_rope(in, out[0], spec);
          }),
      std::move(inputs));
}

mx::array sdpa(const mx::array& q,
               const mx::array& k,
               const mx::array& v,
               float scale,
               const std::string& mask_mode,
               const std::optional<mx::array>& mask_arr,
               const std::optional<mx::array>& sinks,
               mx::StreamOrDevice s_) {
  auto ref = mx::fast::scaled_dot_product_attention(
      q, k, v, scale, mask_mode, mask_arr, sinks, false, s_);
  const mx::Stream s = mx::to_stream(s_);
  const mx::Dtype t = ref.dtype();
  if (!on_cpu(s) || !float_like(t) || k.shape(2) == 0 || q.size() == 0 ||
      (mask_arr && mask_mode != "array")) {
    return ref;
  }
  const bool causal = mask_mode == "causal";
  const bool has_mask = mask_arr.has_value();
  const bool has_sinks = sinks.has_value();
  std::vector<mx::array> inputs{
      mx::astype(q, t, s), mx::astype(k, t, s), mx::astype(v, t, s)};
  if (has_mask) {
    auto shape = q.shape();
    shape.back() = k.shape(2);
    auto m = mask_arr->dtype() == mx::bool_ ? *mask_arr
                                            : mx::astype(*mask_arr, t, s);
    inputs.push_back(mx::broadcast_to(m, shape, s));
  }
  if (has_sinks) {
    inputs.push_back(mx::astype(*sinks, t, s));
  }
  const SdpaSpec spec{scale, causal, has_mask, has_sinks};
  auto fallback = [spec, s](std::vector<mx::array> in) {
    std::optional<mx::array> mask, sk;
    if (spec.has_mask) {
      mask = in[3];
    }
    if (spec.has_sinks) {
      sk = in.back();
    }
    return std::vector<mx::array>{mx::fast::scaled_dot_product_attention(
        in[0],
        in[1],
        in[2],
        spec.scale,
        spec.causal ? "causal" : (spec.has_mask ? "array" : ""),
        mask,
        sk,
        false,
        s)};
  };
  return mx::array(
      ref.shape(),
      t,
      std::make_shared<CpuPrimitive>(
          s,
          "FusedAttention",
          key_of({scale, double(causal), double(has_mask), double(has_sinks)}),
          fallback,
          [spec](std::vector<mx::array>& in, std::vector<mx::array>& out) {
            run_sdpa(in, out[0], spec);
          }),
      std::move(inputs));
}

} // namespace mlx_harmony_core::fused
