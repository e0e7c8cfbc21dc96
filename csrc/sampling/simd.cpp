#include "sampling/simd.h"

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define MHC_VECTOR __attribute__((target_clones("avx2", "default")))
#else
#define MHC_VECTOR
#endif

namespace mlx_harmony_core::simd {

namespace {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f8 splat(float v) {
  return f8{} + v;
}

inline float hmax(f8 v) {
  float m = v[0];
  for (int j = 1; j < kLanes; ++j) {
    m = v[j] > m ? v[j] : m;
  }
  return m;
}

// fast_exp over 8 lanes (the same polynomial).
inline f8 fast_exp8(f8 x) {
  const f8 lo = splat(-87.0f);
  const f8 xc = x < lo ? lo : x;
  const f8 t = xc * 1.44269504088896341f;
  const f8 n = (t + 12582912.0f) - 12582912.0f; // round to nearest
  f8 r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i8 bits = (i8)p + __builtin_convertvector(n, i8) * (1 << 23);
  return x < lo ? f8{} : (f8)bits;
}

} // namespace

MHC_VECTOR void scan_max(const float* x, int64_t n, float* m_out, bool* bad) {
  f8 m = splat(-kInf);
  i8 nonfinite{};
  const f8 inf = splat(kInf);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const f8 v = load8(x + i);
    m = v > m ? v : m;
    nonfinite |= (v != v) | (v == inf);
  }
  float mm = hmax(m);
  bool any = false;
  for (int j = 0; j < kLanes; ++j) {
    any |= nonfinite[j] != 0;
  }
  for (; i < n; ++i) {
    const float v = x[i];
    mm = v > mm ? v : mm;
    any |= (v != v) | (v == kInf);
  }
  *m_out = mm;
  *bad = any;
}

MHC_VECTOR double
sum_exp_blocks(const float* x, int64_t n, float m, float s, float* blocks) {
  double total = 0.0;
  for (int64_t b = 0, bi = 0; b < n; b += kBlock, ++bi) {
    const int64_t e = std::min(n, b + kBlock);
    f8 acc{};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      acc += fast_exp8((load8(x + i) - m) * s);
    }
    float sum = 0.0f;
    for (int j = 0; j < kLanes; ++j) {
      sum += acc[j];
    }
    for (; i < e; ++i) {
      sum += fast_exp((x[i] - m) * s);
    }
    blocks[bi] = sum;
    total += sum;
  }
  return total;
}

// Skips 16-wide blocks whose max is below the cut, which is almost all.
MHC_VECTOR void
collect(const float* x, int64_t n, float cut, std::vector<Cand>& out) {
  out.clear();
  cut = cut > kLowest ? cut : kLowest;
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const f8 a = load8(x + i), b = load8(x + i + kLanes);
    if (hmax(a > b ? a : b) >= cut) {
      for (int j = 0; j < 2 * kLanes; ++j) {
        if (x[i + j] >= cut) {
          out.push_back({x[i + j], static_cast<int32_t>(i + j), 0.0});
        }
      }
    }
  }
  for (; i < n; ++i) {
    if (x[i] >= cut) {
      out.push_back({x[i], static_cast<int32_t>(i), 0.0});
    }
  }
}

MHC_VECTOR void profile_counts(
    const float* x, int64_t n, float m, float unit, int64_t* counts) {
  f8 cut[kLevels];
  i8 cacc[kLevels];
  for (int l = 0; l < kLevels; ++l) {
    cut[l] = splat(m - kLevelDeltas[l] * unit);
    cacc[l] = i8{};
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const f8 v = load8(x + i);
    for (int l = 0; l < kLevels; ++l) {
      cacc[l] -= v >= cut[l]; // true lanes are -1
    }
  }
  for (int l = 0; l < kLevels; ++l) {
    counts[l] = 0;
    for (int j = 0; j < kLanes; ++j) {
      counts[l] += cacc[l][j];
    }
  }
  for (; i < n; ++i) {
    for (int l = 0; l < kLevels; ++l) {
      counts[l] += x[i] >= cut[l][0];
    }
  }
}

MHC_VECTOR double profile_mass(
    const float* x, int64_t n, float m, float s, float unit, double* mass) {
  f8 cut[kLevels];
  f8 macc[kLevels];
  f8 total{};
  for (int l = 0; l < kLevels; ++l) {
    cut[l] = splat(m - kLevelDeltas[l] * unit);
    macc[l] = f8{};
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const f8 v = load8(x + i);
    const f8 p = fast_exp8((v - m) * s);
    total += p;
    for (int l = 0; l < kLevels; ++l) {
      macc[l] += v >= cut[l] ? p : f8{};
    }
  }
  double z = 0.0;
  for (int j = 0; j < kLanes; ++j) {
    z += total[j];
  }
  for (int l = 0; l < kLevels; ++l) {
    mass[l] = 0.0;
    for (int j = 0; j < kLanes; ++j) {
      mass[l] += macc[l][j];
    }
  }
  for (; i < n; ++i) {
    const float p = fast_exp((x[i] - m) * s);
    z += p;
    for (int l = 0; l < kLevels; ++l) {
      mass[l] += x[i] >= cut[l][0] ? p : 0.0f;
    }
  }
  return z;
}

MHC_VECTOR int32_t first_index_of(const float* x, int64_t n, float v) {
  const f8 vv = splat(v);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const i8 hit = load8(x + i) == vv;
    bool any = false;
    for (int j = 0; j < kLanes; ++j) {
      any |= hit[j] != 0;
    }
    if (any) {
      break;
    }
  }
  for (; i < n; ++i) {
    if (x[i] == v) {
      return static_cast<int32_t>(i);
    }
  }
  return 0;
}

void apply_mask(float* x, int64_t n, const uint32_t* mask) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    const uint32_t bits = mask[w];
    if (bits == 0xffffffffu) {
      continue; // all allowed: the common word in a loose grammar
    }
    const int64_t end = std::min<int64_t>(n, w * 32 + 32);
    for (int64_t i = w * 32; i < end; ++i) {
      if (!((bits >> (i - w * 32)) & 1u)) {
        x[i] = -kInf;
      }
    }
  }
}

} // namespace mlx_harmony_core::simd
