#include "sampling.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/random.h"
#include "mlx/types/half_types.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

// The hot loops get an AVX2 clone picked at load time; results are identical
// to the baseline clone (fixed 8-lane sums, no FMA contraction).
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define MHC_VECTOR __attribute__((target_clones("avx2", "default")))
#else
#define MHC_VECTOR
#endif

namespace mlx_harmony_core {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr int kLanes = 8;
constexpr int64_t kBlock = 512;

inline uint64_t mix64(uint64_t z) {
  // splitmix64's finalizer: a bijection with full avalanche.
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// 8 floats as one value: plain loops over these vectorize on any ISA (two
// SSE registers on the baseline clone, one AVX register on the AVX2 clone).
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

// exp(x) for x <= ~0, 8 lanes, a few ulp error; exactly 0 below -87.
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

// The same polynomial for one value (candidate weights, block tails).
inline float fast_exp(float x) {
  if (x < -87.0f) {
    return 0.0f;
  }
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) * (1 << 23);
  std::memcpy(&p, &bits, sizeof(p));
  return p;
}

struct Cand {
  float x;
  int32_t id;
  double w; // exp((x - max) / T), filled when needed
};

inline bool higher(const Cand& a, const Cand& b) {
  return a.x > b.x || (a.x == b.x && a.id < b.id);
}

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

// Per-block sums of exp((x - m) * s); returns their total.
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

// Appends every id with x >= cut (and x > -inf); skips 16-wide blocks whose
// max is below the cut, which is almost all of them.
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

// Cut levels below the max, in units the caller chooses (logits for top-k,
// logits/T for top-p): one pass measures how many ids and how much mass lie
// above each, so the candidates are collected once at the right cut.
constexpr int kLevels = 8;
constexpr float kLevelDeltas[kLevels] = {
    0.5f, 1.f, 2.f, 3.f, 4.5f, 7.f, 10.f, 16.f};

// How many ids lie at or above each cut level (no exp: for top-k).
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

// Mass exp((x - m) * s) at or above each cut level, and in total (top-p).
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

template <typename T>
void convert(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
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

void fill_weights(std::vector<Cand>& c, float m, double s, double* total) {
  double z = 0.0;
  for (auto& e : c) {
    e.w = fast_exp((e.x - m) * static_cast<float>(s));
    z += e.w;
  }
  *total = z;
}

// The top `k` ids by value (ties at the k-th value kept), any order.
void top_set(
    const float* x, int64_t n, float m, int64_t k, std::vector<Cand>& out) {
  int64_t counts[kLevels];
  profile_counts(x, n, m, 1.0f, counts);
  float cut = kLowest;
  for (int l = 0; l < kLevels; ++l) {
    if (counts[l] >= k) {
      cut = m - kLevelDeltas[l];
      break;
    }
  }
  collect(x, n, cut, out);
  if (static_cast<int64_t>(out.size()) < k && cut != kLowest) {
    collect(x, n, kLowest, out); // rounding at the cut: take everything
  }
  if (static_cast<int64_t>(out.size()) <= k) {
    return;
  }
  std::nth_element(out.begin(), out.begin() + (k - 1), out.end(), higher);
  const float vk = out[k - 1].x;
  out.erase(std::remove_if(out.begin(),
                           out.end(),
                           [vk](const Cand& c) { return c.x < vk; }),
            out.end());
}

// Keeps the smallest top set whose mass reaches `need` (ties at the boundary
// kept), by weighted quickselect: linear on average, no full sort.
void nucleus(std::vector<Cand>& c, double need) {
  size_t lo = 0, hi = c.size();
  while (hi - lo > 48) {
    // Median of three as pivot value; 3-way partition of [lo, hi).
    const float a = c[lo].x, b = c[(lo + hi) / 2].x, d = c[hi - 1].x;
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), d));
    auto mid1 = std::partition(c.begin() + lo,
                               c.begin() + hi,
                               [pivot](const Cand& e) { return e.x > pivot; });
    auto mid2 = std::partition(
        mid1, c.begin() + hi, [pivot](const Cand& e) { return e.x == pivot; });
    double above = 0.0, equal = 0.0;
    for (auto it = c.begin() + lo; it != mid1; ++it) {
      above += it->w;
    }
    for (auto it = mid1; it != mid2; ++it) {
      equal += it->w;
    }
    const size_t i1 = mid1 - c.begin(), i2 = mid2 - c.begin();
    if (above >= need && i1 > lo) {
      hi = i1;
    } else if (above + equal >= need || i2 == hi) {
      c.resize(i2); // the boundary is the pivot value: keep all its ties
      return;
    } else {
      need -= above + equal;
      lo = i2;
    }
  }
  std::sort(c.begin() + lo, c.begin() + hi, higher);
  size_t i = lo;
  double acc = 0.0;
  while (i < hi) {
    acc += c[i].w;
    ++i;
    if (acc >= need) {
      break;
    }
  }
  while (i < hi && c[i].x == c[i - 1].x) {
    ++i;
  }
  c.resize(i);
}

// Keeps at least the top `k` of `c` in addition to those passing `keep`.
template <typename Keep>
void filter_keep_top(std::vector<Cand>& c, int64_t k, Keep keep) {
  const auto passing = std::count_if(c.begin(), c.end(), keep);
  if (passing >= k || passing == static_cast<int64_t>(c.size())) {
    c.erase(std::remove_if(
                c.begin(), c.end(), [&](const Cand& e) { return !keep(e); }),
            c.end());
    return;
  }
  if (static_cast<int64_t>(c.size()) > k) {
    std::nth_element(c.begin(), c.begin() + (k - 1), c.end(), higher);
    const float vk = c[k - 1].x;
    c.erase(std::remove_if(
                c.begin(), c.end(), [vk](const Cand& e) { return e.x < vk; }),
            c.end());
  }
}

struct Scratch {
  std::vector<float> buf, raw, blocks;
  std::vector<Cand> cand, extra;
  std::vector<int32_t> hist;
  std::vector<std::pair<int32_t, float>> overrides;
};

struct RowOut {
  int32_t id = 0;
  float logprob = 0.0f;
  int32_t* top_ids = nullptr;
  float* top_logprobs = nullptr;
};

bool has_penalties(const SamplingOptions& o) {
  return o.repetition_penalty != 1.0f || o.presence_penalty != 0.0f ||
         o.frequency_penalty != 0.0f;
}

// Bias and penalties touch few ids: compute their new values only.
template <typename T>
void build_overrides(const T* raw,
                     const int32_t* hist,
                     int64_t w,
                     const int32_t* bias_ids,
                     const float* bias_vals,
                     int64_t nb,
                     const SamplingOptions& o,
                     Scratch& sc) {
  sc.overrides.clear();
  sc.hist.clear();
  if (has_penalties(o)) {
    for (int64_t i = 0; i < w; ++i) {
      if (hist[i] >= 0) {
        sc.hist.push_back(hist[i]);
      }
    }
    std::sort(sc.hist.begin(), sc.hist.end());
  }
  for (int64_t i = 0; i < nb; ++i) {
    sc.overrides.push_back({bias_ids[i], bias_vals[i]});
  }
  for (size_t i = 0; i < sc.hist.size();) {
    size_t j = i;
    while (j < sc.hist.size() && sc.hist[j] == sc.hist[i]) {
      ++j;
    }
    sc.overrides.push_back({sc.hist[i], std::nanf("")}); // NaN: penalize
    i = j;
  }
  if (sc.overrides.empty()) {
    return;
  }
  // Merge entries per id: bias first, then the penalties on the biased value.
  std::stable_sort(sc.overrides.begin(),
                   sc.overrides.end(),
                   [](auto& a, auto& b) { return a.first < b.first; });
  std::vector<std::pair<int32_t, float>> merged;
  for (size_t i = 0; i < sc.overrides.size();) {
    const int32_t id = sc.overrides[i].first;
    float v = static_cast<float>(raw[id]);
    bool penalize = false;
    for (; i < sc.overrides.size() && sc.overrides[i].first == id; ++i) {
      const float b = sc.overrides[i].second;
      if (std::isnan(b)) {
        penalize = true;
      } else {
        v += b;
      }
    }
    if (penalize) {
      const auto range = std::equal_range(sc.hist.begin(), sc.hist.end(), id);
      const float count = static_cast<float>(range.second - range.first);
      if (o.repetition_penalty != 1.0f) {
        v = v < 0.0f ? v * o.repetition_penalty : v / o.repetition_penalty;
      }
      v -= o.presence_penalty;
      v -= o.frequency_penalty * count;
    }
    merged.push_back({id, v});
  }
  sc.overrides.swap(merged);
}

// Inverse-CDF draw over the whole row, skipping `removed` (sorted ids).
int32_t draw_full(const float* x,
                  int64_t n,
                  float m,
                  float s,
                  const float* blocks,
                  double total,
                  const std::vector<Cand>& removed,
                  double u) {
  double removed_mass = 0.0;
  for (auto& r : removed) {
    removed_mass += r.w;
  }
  const double target = u * (total - removed_mass);
  double acc = 0.0;
  size_t ri = 0;
  int64_t last = -1;
  for (int64_t b = 0, bi = 0; b < n; b += kBlock, ++bi) {
    const int64_t e = std::min(n, b + kBlock);
    double block_removed = 0.0;
    size_t rj = ri;
    while (rj < removed.size() && removed[rj].id < e) {
      block_removed += removed[rj++].w;
    }
    const double mass = blocks[bi] - block_removed;
    if (acc + mass <= target && e < n) {
      acc += mass;
      ri = rj;
      if (mass > 0.0) {
        last = b; // some element of this block has mass
      }
      continue;
    }
    for (int64_t i = b; i < e; ++i) {
      if (ri < removed.size() && removed[ri].id == i) {
        ++ri;
        continue;
      }
      const float p = fast_exp((x[i] - m) * s);
      if (p > 0.0f) {
        acc += p;
        last = i;
        if (acc > target) {
          return static_cast<int32_t>(i);
        }
      }
    }
  }
  // Rounding left the target above the final sum: the last id with mass.
  if (last >= 0 && x[last] > -kInf) {
    return static_cast<int32_t>(last);
  }
  return first_index_of(x, n, m);
}

int32_t draw_list(const std::vector<Cand>& c, double total, double u) {
  const double target = u * total;
  double acc = 0.0;
  for (auto& e : c) {
    acc += e.w;
    if (acc > target) {
      return e.id;
    }
  }
  return c.back().id;
}

template <typename T>
void sample_row(const T* raw,
                int64_t n,
                const int32_t* hist,
                int64_t w,
                const int32_t* bias_ids,
                const float* bias_vals,
                int64_t nb,
                const SamplingOptions& o,
                int64_t row,
                Scratch& sc,
                RowOut& out) {
  build_overrides(raw, hist, w, bias_ids, bias_vals, nb, o, sc);
  const float* x;
  if constexpr (std::is_same_v<T, float>) {
    x = raw;
  }
  if (!std::is_same_v<T, float> || !sc.overrides.empty()) {
    sc.buf.resize(n);
    convert(raw, sc.buf.data(), n);
    for (auto& [id, v] : sc.overrides) {
      sc.buf[id] = v;
    }
    x = sc.buf.data();
  }
  float m;
  bool bad;
  scan_max(x, n, &m, &bad);
  if (bad) {
    out.id = kErrorNonFinite;
    return;
  }
  if (m == -kInf) {
    out.id = kErrorNoCandidate;
    return;
  }
  sc.blocks.resize((n + kBlock - 1) / kBlock);

  if (o.temperature == 0.0f) {
    out.id = first_index_of(x, n, m);
  } else {
    const float temp = o.temperature;
    const float s = 1.0f / temp;
    const int64_t keep_min = std::max<int64_t>(1, o.min_tokens_to_keep);
    const bool k_on = o.top_k > 0 && std::max<int64_t>(o.top_k, keep_min) < n;
    const bool p_on = o.top_p < 1.0f;
    const bool minp_on = o.min_p > 0.0f;
    const bool xtc_on =
        o.xtc_probability > 0.0f &&
        uniform01(o.seed, o.counter, row, 1) < o.xtc_probability;
    auto& c = sc.cand;
    bool full = true; // the kept set is the whole row (minus `removed`)
    double z_full = -1.0;
    auto full_mass = [&]() {
      if (z_full < 0.0) {
        z_full = sum_exp_blocks(x, n, m, s, sc.blocks.data());
      }
      return z_full;
    };
    double z_list = 0.0;

    if (k_on) {
      top_set(x, n, m, std::max<int64_t>(o.top_k, keep_min), c);
      fill_weights(c, m, s, &z_list);
      full = false;
    }
    if (p_on) {
      double need;
      if (full) {
        // Grow a top set until it holds the nucleus, then select within it.
        // Collect once at a cut whose mass reaches the nucleus (with a
        // margin for the profile's float sums), then select within it.
        double mass[kLevels];
        need = o.top_p * profile_mass(x, n, m, s, temp, mass);
        const double margin = 1.0 - 1e-5;
        float cut = kLowest;
        for (int l = 0; l < kLevels; ++l) {
          if (mass[l] >= need * (2.0 - margin)) {
            cut = m - kLevelDeltas[l] * temp;
            break;
          }
        }
        collect(x, n, cut, c);
        if (static_cast<int64_t>(c.size()) < keep_min) {
          collect(x, n, kLowest, c);
        }
        fill_weights(c, m, s, &z_list);
        if (z_list < need * margin && cut != kLowest) {
          collect(x, n, kLowest, c);
          fill_weights(c, m, s, &z_list);
        }
        need = std::min(need, z_list);
        full = false;
      } else {
        need = o.top_p * z_list;
      }
      nucleus(c, need);
      if (static_cast<int64_t>(c.size()) < keep_min) {
        top_set(x, n, m, keep_min, c);
      }
      fill_weights(c, m, s, &z_list);
    }
    if (minp_on) {
      const float cut = m + std::log(o.min_p) * temp;
      if (full) {
        collect(x, n, cut, c);
        if (static_cast<int64_t>(c.size()) < keep_min) {
          top_set(x, n, m, keep_min, c);
        }
        full = false;
      } else {
        filter_keep_top(
            c, keep_min, [cut](const Cand& e) { return e.x >= cut; });
      }
      fill_weights(c, m, s, &z_list);
    }
    auto& removed = sc.extra;
    removed.clear();
    if (xtc_on) {
      // Drop every token above the threshold except the least likely one.
      const double z = full ? full_mass() : z_list;
      const double lim = static_cast<double>(o.xtc_threshold) * z;
      const float cut =
          lim > 0.0 ? std::nextafter(
                          static_cast<float>(m + temp * std::log(lim)), kInf)
                    : kLowest;
      if (full) {
        collect(x, n, cut, removed);
      } else {
        for (auto& e : c) {
          if (e.x >= cut) {
            removed.push_back(e);
          }
        }
      }
      // Exact check in double: p > threshold.
      removed.erase(std::remove_if(removed.begin(),
                                   removed.end(),
                                   [&](const Cand& e) {
                                     return std::exp((double(e.x) - m) * s) <=
                                            lim;
                                   }),
                    removed.end());
      if (removed.size() >= 2) {
        float least = removed[0].x;
        for (auto& e : removed) {
          least = std::min(least, e.x);
        }
        removed.erase(
            std::remove_if(removed.begin(),
                           removed.end(),
                           [least](const Cand& e) { return e.x <= least; }),
            removed.end());
      } else {
        removed.clear();
      }
      std::sort(removed.begin(),
                removed.end(),
                [](const Cand& a, const Cand& b) { return a.id < b.id; });
      if (!full && !removed.empty()) {
        auto dropped = [&removed](const Cand& e) {
          return std::binary_search(
              removed.begin(),
              removed.end(),
              e,
              [](const Cand& a, const Cand& b) { return a.id < b.id; });
        };
        c.erase(std::remove_if(c.begin(), c.end(), dropped), c.end());
        fill_weights(c, m, s, &z_list);
        removed.clear();
      }
      for (auto& r : removed) {
        r.w = std::exp((double(r.x) - m) * s);
      }
    }
    const double u = uniform01(o.seed, o.counter, row, 0);
    if (full) {
      out.id = draw_full(x, n, m, s, sc.blocks.data(), full_mass(), removed, u);
    } else {
      out.id = draw_list(c, z_list, u);
    }
  }

  if (o.logprobs >= 0) {
    // Log-probabilities of the model's own distribution (before processing).
    const float* r = x;
    float rm = m;
    if (!sc.overrides.empty()) {
      sc.raw.resize(n);
      convert(raw, sc.raw.data(), n);
      r = sc.raw.data();
      bool unused;
      scan_max(r, n, &rm, &unused);
    }
    const double lse =
        rm + std::log(sum_exp_blocks(r, n, rm, 1.0f, sc.blocks.data()));
    out.logprob = static_cast<float>(r[out.id] - lse);
    if (o.logprobs > 0) {
      auto& top = sc.extra;
      top_set(r, n, rm, o.logprobs, top);
      std::sort(top.begin(), top.end(), higher);
      for (int64_t i = 0; i < o.logprobs; ++i) {
        const bool ok = i < static_cast<int64_t>(top.size());
        out.top_ids[i] = ok ? top[i].id : -1;
        out.top_logprobs[i] = ok ? static_cast<float>(top[i].x - lse) : -kInf;
      }
    }
  }
}

template <typename T>
void sample_rows(const T* logits,
                 int64_t rows,
                 int64_t n,
                 const int32_t* hist,
                 int64_t w,
                 const int32_t* bias_ids,
                 const float* bias_vals,
                 int64_t nb,
                 const SamplingOptions& o,
                 int32_t* ids,
                 float* logprob,
                 int32_t* top_ids,
                 float* top_logprobs) {
  thread_local Scratch sc;
  const int64_t k = std::max(0, o.logprobs);
  for (int64_t r = 0; r < rows; ++r) {
    RowOut out;
    out.top_ids = top_ids ? top_ids + r * k : nullptr;
    out.top_logprobs = top_logprobs ? top_logprobs + r * k : nullptr;
    if (out.top_ids) {
      std::fill(out.top_ids, out.top_ids + k, -1);
      std::fill(out.top_logprobs, out.top_logprobs + k, -kInf);
    }
    sample_row(logits + r * n,
               n,
               hist + r * w,
               w,
               bias_ids,
               bias_vals,
               nb,
               o,
               r,
               sc,
               out);
    ids[r] = out.id;
    if (logprob) {
      logprob[r] = out.id < 0 ? std::nanf("") : out.logprob;
    }
  }
}

// ---------------------------------------------------------------------------
// The MLX-ops path (GPU, or on request): same semantics, no full sort.
// ---------------------------------------------------------------------------

std::vector<mx::array> sample_ops(const mx::array& logits,
                                  const mx::array& history,
                                  const mx::array& bias_ids,
                                  const mx::array& bias_values,
                                  const SamplingOptions& o,
                                  mx::Stream s) {
  using namespace mx;
  const int B = logits.shape(0), V = logits.shape(1);
  auto raw = astype(logits, float32, s);
  auto x = raw;
  auto ninf = array(-kInf, float32);
  if (bias_ids.size() > 0) {
    auto dense = scatter_add(zeros({V}, float32, s),
                             {bias_ids},
                             reshape(bias_values, {-1, 1}, s),
                             {0},
                             s);
    x = add(x, dense, s);
  }
  if (has_penalties(o) && history.size() > 0) {
    auto valid = greater_equal(history, array(0), s);
    auto idx = where(valid, history, array(0), s);
    auto counts = scatter_add_axis(
        zeros({B, V}, float32, s), idx, astype(valid, float32, s), 1, s);
    auto present = greater(counts, array(0.0f), s);
    if (o.repetition_penalty != 1.0f) {
      auto pen = where(less(x, array(0.0f), s),
                       multiply(x, array(o.repetition_penalty), s),
                       divide(x, array(o.repetition_penalty), s),
                       s);
      x = where(present, pen, x, s);
    }
    if (o.presence_penalty != 0.0f) {
      x = subtract(
          x,
          multiply(astype(present, float32, s), array(o.presence_penalty), s),
          s);
    }
    if (o.frequency_penalty != 0.0f) {
      x = subtract(x, multiply(counts, array(o.frequency_penalty), s), s);
    }
  }
  auto nonfinite = logical_or(isnan(x, s), equal(x, array(kInf), s), s);
  auto bad = any(nonfinite, -1, false, s);
  auto none = all(equal(x, ninf, s), -1, false, s);

  auto key = random::key(mix64(o.seed ^ mix64(o.counter)));
  auto keys = random::split(key, s);
  array ids = argmax(x, -1, false, s);
  if (o.temperature != 0.0f) {
    const float T = o.temperature;
    auto z = multiply(x, array(1.0f / T), s);
    auto zmax = max(z, -1, true, s);
    auto keep = greater(z, ninf, s);
    const int keep_min = std::max(1, o.min_tokens_to_keep);
    // Top-k and min-p compare logits, not logits / T: the same order, and no
    // float32 underflow merging distinct logits.
    auto xmax = max(x, -1, true, s);
    auto kth_value = [&](int k) { // the k-th largest logit of each row
      return min(topk(x, std::min(k, V), -1, s), -1, true, s);
    };
    auto top_min = keep_min > 1 ? kth_value(keep_min) : xmax;
    if (o.top_k > 0 && std::max(o.top_k, keep_min) < V) {
      keep = logical_and(
          keep, greater_equal(x, kth_value(std::max(o.top_k, keep_min)), s), s);
    }
    if (o.top_p < 1.0f) {
      // Bisection on the value threshold: the largest t whose top set
      // {z >= t} still holds top_p of the kept mass.
      auto p = where(keep, exp(subtract(z, zmax, s), s), array(0.0f), s);
      auto need = multiply(sum(p, -1, true, s), array(o.top_p), s);
      auto lo = min(where(keep, z, array(kInf), s), -1, true, s);
      auto hi = add(zmax, array(1.0f), s);
      for (int it = 0; it < 40; ++it) {
        auto mid = multiply(add(lo, hi, s), array(0.5f), s);
        auto mass = sum(
            where(greater_equal(z, mid, s), p, array(0.0f), s), -1, true, s);
        auto ok = greater_equal(mass, need, s);
        lo = where(ok, mid, lo, s);
        hi = where(ok, hi, mid, s);
      }
      auto nucleus =
          logical_or(greater_equal(z, lo, s), greater_equal(x, top_min, s), s);
      keep = logical_and(keep, nucleus, s);
    }
    if (o.min_p > 0.0f) {
      auto cut = add(xmax, array(std::log(o.min_p) * T), s);
      keep =
          logical_and(keep, greater_equal(x, minimum(cut, top_min, s), s), s);
    }
    if (o.xtc_probability > 0.0f) {
      auto zk = where(keep, z, ninf, s);
      auto p = softmax(zk, std::vector<int>{-1}, true, s);
      auto above = greater(p, array(o.xtc_threshold), s);
      auto least = min(where(above, p, array(kInf), s), -1, true, s);
      auto drop = logical_and(above, greater(p, least, s), s);
      auto coin =
          less(random::uniform(
                   array(0.0f), array(1.0f), {B, 1}, float32, keys.second, s),
               array(o.xtc_probability),
               s);
      keep = logical_and(keep, logical_not(logical_and(drop, coin, s), s), s);
    }
    auto g = random::gumbel({B, V}, float32, keys.first, s);
    ids = argmax(add(where(keep, z, ninf, s), g, s), -1, false, s);
  }
  ids = astype(ids, int32, s);
  ids = where(bad,
              array(kErrorNonFinite),
              where(none, array(kErrorNoCandidate), ids, s),
              s);
  std::vector<array> outs{ids};
  if (o.logprobs >= 0) {
    auto lse = logsumexp(raw, std::vector<int>{-1}, true, s);
    auto safe = reshape(maximum(ids, array(0), s), {B, 1}, s);
    auto chosen = subtract(take_along_axis(raw, safe, -1, s), lse, s);
    outs.push_back(reshape(chosen, {B}, s));
    const int k = std::min(o.logprobs, V);
    if (o.logprobs > 0) {
      auto part = slice(
          argpartition(negative(raw, s), k - 1, -1, s), {0, 0}, {B, k}, s);
      auto vals = take_along_axis(raw, part, -1, s);
      auto order = argsort(negative(vals, s), -1, s);
      auto top_ids = astype(take_along_axis(part, order, -1, s), int32, s);
      auto top_lp = subtract(take_along_axis(vals, order, -1, s), lse, s);
      if (k < o.logprobs) {
        top_ids = concatenate(
            {top_ids, full({B, o.logprobs - k}, array(-1), s)}, -1, s);
        top_lp =
            concatenate({top_lp, full({B, o.logprobs - k}, ninf, s)}, -1, s);
      }
      outs.push_back(top_ids);
      outs.push_back(top_lp);
    } else {
      outs.push_back(zeros({B, 0}, int32, s));
      outs.push_back(zeros({B, 0}, float32, s));
    }
  }
  return outs;
}

} // namespace

double uniform01(uint64_t seed, uint64_t counter, uint64_t row, uint64_t lane) {
  uint64_t h = mix64(seed + 0x9e3779b97f4a7c15ULL);
  h = mix64(h ^ (counter * 0xd1b54a32d192ed03ULL + 0x632be59bd9b4e019ULL));
  h = mix64(h ^
            (row * 0x8cb92ba72f3d8dd7ULL + lane * 0x9e3779b97f4a7c15ULL + 1));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

void validate(const SamplingOptions& o) {
  auto fail = [](const std::string& m) { throw std::invalid_argument(m); };
  if (!(o.temperature >= 0.0f) || std::isinf(o.temperature)) {
    fail("temperature must be a finite number >= 0 (0 = greedy)");
  }
  if (o.top_k < 0) {
    fail("top_k must be >= 0 (0 = off)");
  }
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) {
    fail("top_p must be in (0, 1] (1 = off)");
  }
  if (!(o.min_p >= 0.0f && o.min_p <= 1.0f)) {
    fail("min_p must be in [0, 1] (0 = off)");
  }
  if (o.min_tokens_to_keep < 1) {
    fail("min_tokens_to_keep must be >= 1");
  }
  if (!(o.xtc_probability >= 0.0f && o.xtc_probability <= 1.0f)) {
    fail("xtc_probability must be in [0, 1]");
  }
  if (!(o.xtc_threshold >= 0.0f && o.xtc_threshold <= 0.5f)) {
    fail("xtc_threshold must be in [0, 0.5]");
  }
  if (!(o.repetition_penalty > 0.0f) || std::isinf(o.repetition_penalty)) {
    fail("repetition_penalty must be a finite number > 0 (1 = off)");
  }
  if (!std::isfinite(o.presence_penalty) ||
      !std::isfinite(o.frequency_penalty)) {
    fail("presence_penalty and frequency_penalty must be finite");
  }
  if (o.logprobs < -1) {
    fail("logprobs must be >= 0 (or -1 for none)");
  }
}

std::vector<mx::array> sample(const mx::array& logits,
                              const mx::array& history,
                              const mx::array& bias_ids,
                              const mx::array& bias_values,
                              const SamplingOptions& options,
                              std::optional<bool> kernel,
                              mx::StreamOrDevice s) {
  validate(options);
  if (logits.ndim() != 1 && logits.ndim() != 2) {
    throw std::invalid_argument("logits must have shape (V,) or (B, V); got " +
                                std::to_string(logits.ndim()) + " dimensions");
  }
  const auto dt = logits.dtype();
  if (dt != mx::float32 && dt != mx::float16 && dt != mx::bfloat16) {
    throw std::invalid_argument(
        "logits must be float32, float16 or bfloat16; cast them with "
        ".astype(mx.float32)");
  }
  const int V = logits.shape(-1);
  if (V == 0) {
    throw std::invalid_argument("logits have an empty vocabulary axis (V = 0)");
  }
  if (options.top_k > V) {
    throw std::invalid_argument("top_k (" + std::to_string(options.top_k) +
                                ") is larger than the vocabulary (" +
                                std::to_string(V) + ")");
  }
  auto stream = mx::to_stream(s);
  const bool batched = logits.ndim() == 2;
  auto rows = batched ? logits : mx::reshape(logits, {1, V}, stream);
  const int B = rows.shape(0);

  auto hist = history;
  if (hist.size() == 0) {
    hist = mx::zeros({B, 0}, mx::int32, stream);
  } else if (hist.ndim() == 1 && !batched) {
    hist = mx::reshape(hist, {1, -1}, stream);
  }
  if (hist.ndim() != 2 || hist.shape(0) != B) {
    throw std::invalid_argument(
        "history must have one row per logits row: shape (B, W)");
  }
  if (hist.dtype() != mx::int32) {
    throw std::invalid_argument("history must be int32 token ids");
  }
  if (bias_ids.ndim() != 1 || bias_values.ndim() != 1 ||
      bias_ids.size() != bias_values.size()) {
    throw std::invalid_argument(
        "logit bias ids and values must be 1-D and of the same length");
  }
  if (bias_ids.size() > 0 &&
      (bias_ids.dtype() != mx::int32 || bias_values.dtype() != mx::float32)) {
    throw std::invalid_argument(
        "logit bias ids must be int32 and values float32");
  }

  const bool on_cpu = stream.device == mx::Device::cpu;
  std::vector<mx::array> outs;
  if (kernel.value_or(on_cpu)) {
    if (!on_cpu) {
      throw std::invalid_argument("the sampling kernel runs on the CPU only");
    }
    std::vector<mx::array> inputs{
        mx::contiguous(rows, false, stream),
        mx::contiguous(hist, false, stream),
        mx::contiguous(mx::astype(bias_ids, mx::int32, stream), false, stream),
        mx::contiguous(
            mx::astype(bias_values, mx::float32, stream), false, stream)};
    std::vector<mx::Shape> shapes{{B}};
    std::vector<mx::Dtype> dtypes{mx::int32};
    if (options.logprobs >= 0) {
      shapes.insert(shapes.end(),
                    {{B}, {B, options.logprobs}, {B, options.logprobs}});
      dtypes.insert(dtypes.end(), {mx::float32, mx::int32, mx::float32});
    }
    outs = mx::array::make_arrays(std::move(shapes),
                                  dtypes,
                                  std::make_shared<Sample>(stream, options),
                                  inputs);
  } else {
    outs = sample_ops(rows, hist, bias_ids, bias_values, options, stream);
  }
  if (!batched) {
    outs[0] = mx::reshape(outs[0], {}, stream);
    if (outs.size() > 1) {
      outs[1] = mx::reshape(outs[1], {}, stream);
      outs[2] = mx::reshape(outs[2], {options.logprobs}, stream);
      outs[3] = mx::reshape(outs[3], {options.logprobs}, stream);
    }
  }
  return outs;
}

void Sample::eval_cpu(const std::vector<mx::array>& inputs,
                      std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    encoder.set_output_array(out);
  }
  std::vector<mx::array> ins, outs;
  for (auto& in : inputs) {
    ins.push_back(mx::array::unsafe_weak_copy(in));
  }
  for (auto& out : outputs) {
    outs.push_back(mx::array::unsafe_weak_copy(out));
  }
  encoder.dispatch([ins = std::move(ins),
                    outs = std::move(outs),
                    o = options_]() mutable {
    const auto& logits = ins[0];
    const int64_t rows = logits.shape(0), n = logits.shape(1);
    const int64_t w = ins[1].shape(1), nb = ins[2].size();
    const int32_t* hist = ins[1].data<int32_t>();
    const int32_t* bids = nb ? ins[2].data<int32_t>() : nullptr;
    const float* bvals = nb ? ins[3].data<float>() : nullptr;
    int32_t* ids = outs[0].data<int32_t>();
    float* lp = outs.size() > 1 ? outs[1].data<float>() : nullptr;
    int32_t* tid = outs.size() > 1 ? outs[2].data<int32_t>() : nullptr;
    float* tlp = outs.size() > 1 ? outs[3].data<float>() : nullptr;
    auto run = [&](const auto* x) {
      sample_rows(x, rows, n, hist, w, bids, bvals, nb, o, ids, lp, tid, tlp);
    };
    switch (logits.dtype()) {
    case mx::float32:
      run(logits.data<float>());
      break;
    case mx::float16:
      run(logits.data<mx::float16_t>());
      break;
    case mx::bfloat16:
      run(logits.data<mx::bfloat16_t>());
      break;
    default:
      std::fill(ids, ids + rows, kErrorNonFinite);
    }
  });
}

void Sample::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "MhcSample runs on the CPU; on a GPU stream sample() builds MLX ops");
}

} // namespace mlx_harmony_core
