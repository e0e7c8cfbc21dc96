#include "sampling/kernel.h"

#include "mlx/types/half_types.h"
#include "sampling/simd.h"

#include <algorithm>
#include <cmath>

namespace mlx_harmony_core::kernel {

namespace {

using namespace simd;

// Per-thread buffers reused across rows and calls.
struct Scratch {
  std::vector<float> buf, raw, blocks;
  std::vector<Cand> cand, removed, top;
  std::vector<int32_t> hist;
  std::vector<std::pair<int32_t, float>> overrides, merged;
  std::vector<double> block_mass;
};

// What the stages share: the processed row, and the kept set so far. While
// `full`, the kept set is the whole row minus `removed` (no candidate list
// yet); after the first filter it is `c` with total weight `z`.
struct Row {
  const float* x;
  int64_t n;
  float m;          // max of x
  float temp, s;    // temperature and 1 / temperature
  int64_t keep_min; // min_tokens_to_keep
  std::vector<Cand>& c;
  std::vector<Cand>& removed;
  float* blocks;
  bool full = true;
  double z = 0.0;
  double z_full = -1.0;

  double full_mass() {
    if (z_full < 0.0) {
      z_full = sum_exp_blocks(x, n, m, s, blocks);
    }
    return z_full;
  }
  void reweigh() {
    z = 0.0;
    for (auto& e : c) {
      e.w = fast_exp((e.x - m) * s);
      z += e.w;
    }
  }
  // The top `k` ids by value into `out` (ties at the k-th value kept).
  void top_set(int64_t k, std::vector<Cand>& out) const {
    top_ids(x, n, m, k, out);
  }
  static void top_ids(
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
};

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

// Keeps the smallest top set whose mass reaches `need` (ties at the boundary
// kept), by weighted quickselect: linear on average, no full sort.
void nucleus(std::vector<Cand>& c, double need) {
  size_t lo = 0, hi = c.size();
  while (hi - lo > 48) {
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

bool has_penalties(const SamplingOptions& o) {
  return o.repetition_penalty != 1.0f || o.presence_penalty != 0.0f ||
         o.frequency_penalty != 0.0f;
}

// -- stage: prepare ---------------------------------------------------------
// Bias and penalties touch few ids: only their new values are computed.
template <typename T>
void overrides(const T* raw,
               const int32_t* hist,
               int64_t w,
               const int32_t* bias_ids,
               const float* bias_vals,
               int64_t nb,
               const SamplingOptions& o,
               Scratch& sc) {
  auto& ov = sc.overrides;
  ov.clear();
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
    ov.push_back({bias_ids[i], bias_vals[i]});
  }
  for (size_t i = 0; i < sc.hist.size();) {
    size_t j = i;
    while (j < sc.hist.size() && sc.hist[j] == sc.hist[i]) {
      ++j;
    }
    ov.push_back({sc.hist[i], std::nanf("")}); // NaN: penalize
    i = j;
  }
  if (ov.empty()) {
    return;
  }
  // Merge entries per id: bias first, then the penalties on the biased value.
  std::stable_sort(
      ov.begin(), ov.end(), [](auto& a, auto& b) { return a.first < b.first; });
  auto& merged = sc.merged;
  merged.clear();
  for (size_t i = 0; i < ov.size();) {
    const int32_t id = ov[i].first;
    float v = static_cast<float>(raw[id]);
    bool penalize = false;
    for (; i < ov.size() && ov[i].first == id; ++i) {
      if (std::isnan(ov[i].second)) {
        penalize = true;
      } else {
        v += ov[i].second;
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
  ov.swap(merged);
}

// The processed row: mask, then bias and penalties. Points at `raw` itself
// when nothing changes it (float32 without processors).
template <typename T>
const float*
prepare(const T* raw, int64_t n, const uint32_t* mask, Scratch& sc) {
  if constexpr (std::is_same_v<T, float>) {
    if (sc.overrides.empty() && mask == nullptr) {
      return raw;
    }
  }
  sc.buf.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    sc.buf[i] = static_cast<float>(raw[i]);
  }
  for (auto& [id, v] : sc.overrides) {
    sc.buf[id] = v;
  }
  if (mask != nullptr) {
    apply_mask(sc.buf.data(), n, mask); // after the bias: no bias unmasks
  }
  return sc.buf.data();
}

// -- stage: top-k -----------------------------------------------------------
void top_k(Row& r, const SamplingOptions& o) {
  if (o.top_k <= 0 || std::max<int64_t>(o.top_k, r.keep_min) >= r.n) {
    return;
  }
  r.top_set(std::max<int64_t>(o.top_k, r.keep_min), r.c);
  r.reweigh();
  r.full = false;
}

// -- stage: top-p -----------------------------------------------------------
void top_p(Row& r, const SamplingOptions& o) {
  if (!(o.top_p < 1.0f)) {
    return;
  }
  double need;
  if (r.full) {
    // Collect once at a cut whose mass reaches the nucleus (with a margin for
    // the profile's float sums), then select within it.
    double mass[kLevels];
    need = o.top_p * profile_mass(r.x, r.n, r.m, r.s, r.temp, mass);
    const double margin = 1.0 - 1e-5;
    float cut = kLowest;
    for (int l = 0; l < kLevels; ++l) {
      if (mass[l] >= need * (2.0 - margin)) {
        cut = r.m - kLevelDeltas[l] * r.temp;
        break;
      }
    }
    collect(r.x, r.n, cut, r.c);
    if (static_cast<int64_t>(r.c.size()) < r.keep_min) {
      collect(r.x, r.n, kLowest, r.c);
    }
    r.reweigh();
    if (r.z < need * margin && cut != kLowest) {
      collect(r.x, r.n, kLowest, r.c);
      r.reweigh();
    }
    need = std::min(need, r.z);
    r.full = false;
  } else {
    need = o.top_p * r.z;
  }
  nucleus(r.c, need);
  if (static_cast<int64_t>(r.c.size()) < r.keep_min) {
    r.top_set(r.keep_min, r.c);
  }
  r.reweigh();
}

// -- stage: min-p -----------------------------------------------------------
void min_p(Row& r, const SamplingOptions& o) {
  if (!(o.min_p > 0.0f)) {
    return;
  }
  const float cut = r.m + std::log(o.min_p) * r.temp;
  if (r.full) {
    collect(r.x, r.n, cut, r.c);
    if (static_cast<int64_t>(r.c.size()) < r.keep_min) {
      r.top_set(r.keep_min, r.c);
    }
    r.full = false;
  } else {
    filter_keep_top(
        r.c, r.keep_min, [cut](const Cand& e) { return e.x >= cut; });
  }
  r.reweigh();
}

// -- stage: XTC -------------------------------------------------------------
// With probability xtc_probability (the coin), drop every token above the
// threshold except the least likely of them.
void xtc(Row& r, const SamplingOptions& o, bool coin) {
  auto& removed = r.removed;
  removed.clear();
  if (!(o.xtc_probability > 0.0f) || !coin) {
    return;
  }
  const double z = r.full ? r.full_mass() : r.z;
  const double lim = static_cast<double>(o.xtc_threshold) * z;
  const float cut =
      lim > 0.0 ? std::nextafter(
                      static_cast<float>(r.m + r.temp * std::log(lim)), kInf)
                : kLowest;
  if (r.full) {
    collect(r.x, r.n, cut, removed);
  } else {
    for (auto& e : r.c) {
      if (e.x >= cut) {
        removed.push_back(e);
      }
    }
  }
  const float m = r.m;
  const double s = r.s;
  // Exact check in double: p > threshold.
  removed.erase(std::remove_if(removed.begin(),
                               removed.end(),
                               [&](const Cand& e) {
                                 return std::exp((double(e.x) - m) * s) <= lim;
                               }),
                removed.end());
  if (removed.size() < 2) {
    removed.clear();
    return;
  }
  float least = removed[0].x;
  for (auto& e : removed) {
    least = std::min(least, e.x);
  }
  removed.erase(std::remove_if(removed.begin(),
                               removed.end(),
                               [least](const Cand& e) { return e.x <= least; }),
                removed.end());
  auto by_id = [](const Cand& a, const Cand& b) { return a.id < b.id; };
  std::sort(removed.begin(), removed.end(), by_id);
  if (!r.full) {
    r.c.erase(std::remove_if(r.c.begin(),
                             r.c.end(),
                             [&](const Cand& e) {
                               return std::binary_search(
                                   removed.begin(), removed.end(), e, by_id);
                             }),
              r.c.end());
    r.reweigh();
    removed.clear();
    return;
  }
  for (auto& e : removed) {
    e.w = std::exp((double(e.x) - m) * s);
  }
}

// -- stage: draw ------------------------------------------------------------
// An exponential race, keyed by token id: the kept token with the smallest
// E_i / w_i (E_i ~ Exp(1) from (seed, counter, row, id)) wins, which draws
// i with probability w_i / sum(w), exactly. Unlike an inverse CDF, the winner
// depends on no running sum: logits that differ by rounding (another batch
// size, another BLAS kernel) pick the same token unless two ratios tie to
// within that rounding. Over the whole row it runs in two stages, blocks of
// kBlock ids by their mass, then ids within the block, so only one block is
// exponentiated again.
struct Race {
  const SamplingOptions& o;
  uint64_t row;

  // Lanes 0 and 1 are XTC's coin and spare; blocks and ids get their own.
  double key(uint64_t lane) const {
    return -std::log1p(-uniform01(o.seed, o.counter, row, lane));
  }
  double block(int64_t b) const {
    return key(3 + 2 * static_cast<uint64_t>(b));
  }
  double token(int32_t id) const {
    return key(2 + 2 * static_cast<uint64_t>(id));
  }
};

int32_t draw_full(Row& r, const Race& race) {
  const auto& removed = r.removed; // sorted by id
  const float* x = r.x;
  const int64_t n = r.n;
  r.full_mass(); // fills r.blocks
  int64_t best_block = -1;
  double best = kInf;
  size_t ri = 0;
  for (int64_t b = 0, bi = 0; b < n; b += kBlock, ++bi) {
    const int64_t e = std::min(n, b + kBlock);
    double mass = r.blocks[bi];
    for (; ri < removed.size() && removed[ri].id < e; ++ri) {
      mass -= removed[ri].w;
    }
    if (mass > 0.0) {
      const double t = race.block(bi) / mass;
      if (t < best) {
        best = t;
        best_block = b;
      }
    }
  }
  if (best_block < 0) {
    return first_index_of(x, n, r.m);
  }
  const int64_t e = std::min(n, best_block + kBlock);
  auto rm = std::lower_bound(removed.begin(),
                             removed.end(),
                             best_block,
                             [](const Cand& c, int64_t v) { return c.id < v; });
  int32_t win = -1;
  best = kInf;
  for (int64_t i = best_block; i < e; ++i) {
    if (rm != removed.end() && rm->id == i) {
      ++rm;
      continue;
    }
    const float p = fast_exp((x[i] - r.m) * r.s);
    if (p > 0.0f) {
      const double t = race.token(static_cast<int32_t>(i)) / p;
      if (t < best) {
        best = t;
        win = static_cast<int32_t>(i);
      }
    }
  }
  return win >= 0 ? win : first_index_of(x, n, r.m);
}

int32_t draw(Row& r, const Race& race, Scratch& sc) {
  if (r.full) {
    return draw_full(r, race);
  }
  auto& c = r.c;
  auto race_over = [&](auto&& in) {
    int32_t win = c.front().id;
    double best = kInf;
    for (auto& e : c) {
      if (e.w > 0.0 && in(e.id)) {
        const double t = race.token(e.id) / e.w;
        if (t < best) {
          best = t;
          win = e.id;
        }
      }
    }
    return win;
  };
  if (c.size() <= static_cast<size_t>(2 * kBlock)) {
    return race_over([](int32_t) { return true; });
  }
  // Many kept: first a block of ids by its kept mass, then within it.
  sc.block_mass.assign((r.n + kBlock - 1) / kBlock, 0.0);
  for (auto& e : c) {
    sc.block_mass[e.id / kBlock] += e.w;
  }
  int64_t pick = 0;
  double best = kInf;
  for (size_t b = 0; b < sc.block_mass.size(); ++b) {
    if (sc.block_mass[b] > 0.0) {
      const double t = race.block(static_cast<int64_t>(b)) / sc.block_mass[b];
      if (t < best) {
        best = t;
        pick = static_cast<int64_t>(b);
      }
    }
  }
  return race_over([pick](int32_t id) { return id / kBlock == pick; });
}

// -- stage: logprobs --------------------------------------------------------
// Log-probabilities of the model's own distribution (before any processing).
template <typename T>
void logprobs(const T* raw,
              bool processed,
              const float* x,
              float m,
              int64_t n,
              int32_t id,
              int k,
              Scratch& sc,
              float* lp,
              int32_t* top_ids,
              float* top_lps) {
  const float* r = x;
  float rm = m;
  if (processed) {
    sc.raw.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      sc.raw[i] = static_cast<float>(raw[i]);
    }
    r = sc.raw.data();
    bool unused;
    scan_max(r, n, &rm, &unused);
  }
  const double lse =
      rm + std::log(sum_exp_blocks(r, n, rm, 1.0f, sc.blocks.data()));
  *lp = static_cast<float>(r[id] - lse);
  if (k <= 0) {
    return;
  }
  auto& top = sc.top;
  Row::top_ids(r, n, rm, k, top);
  std::sort(top.begin(), top.end(), higher);
  for (int64_t i = 0; i < k; ++i) {
    const bool ok = i < static_cast<int64_t>(top.size());
    top_ids[i] = ok ? top[i].id : -1;
    top_lps[i] = ok ? static_cast<float>(top[i].x - lse) : -kInf;
  }
}

template <typename T>
void sample_rows(const T* logits,
                 const std::vector<mx::array>& ins,
                 std::vector<mx::array>& outs,
                 const std::vector<SamplingOptions>& opts,
                 bool per_row,
                 bool has_mask) {
  thread_local Scratch sc;
  const int64_t rows = ins[0].shape(0), n = ins[0].shape(1);
  const int64_t w = ins[1].shape(1), nb = ins[2].size();
  const mx::array* mask_in = has_mask ? &ins.back() : nullptr;
  const int64_t mw = mask_in ? mask_in->shape(1) : 0;
  const int32_t* hist = ins[1].data<int32_t>();
  const int32_t* bias_ids = nb ? ins[2].data<int32_t>() : nullptr;
  const float* bias_vals = nb ? ins[3].data<float>() : nullptr;
  const int32_t* bias_off = per_row ? ins[4].data<int32_t>() : nullptr;
  const uint32_t* masks = mw ? mask_in->data<uint32_t>() : nullptr;
  int32_t* ids = outs[0].data<int32_t>();
  const bool want_lp = outs.size() > 1;
  const int k = want_lp ? static_cast<int>(outs[2].shape(1)) : 0;
  sc.blocks.resize((n + kBlock - 1) / kBlock);

  for (int64_t row = 0; row < rows; ++row) {
    const SamplingOptions& o = opts[per_row ? row : 0];
    // A batch of requests keys each row as row 0 of its own call.
    const uint64_t key_row = per_row ? 0 : static_cast<uint64_t>(row);
    const T* raw = logits + row * n;
    int32_t* top_ids = want_lp ? outs[2].data<int32_t>() + row * k : nullptr;
    float* top_lps = want_lp ? outs[3].data<float>() + row * k : nullptr;
    float* lp = want_lp ? outs[1].data<float>() + row : nullptr;
    if (want_lp) {
      std::fill(top_ids, top_ids + k, -1);
      std::fill(top_lps, top_lps + k, -kInf);
      *lp = std::nanf("");
    }
    int64_t b0 = 0, b1 = nb;
    if (per_row) {
      b0 = bias_off[row];
      b1 = bias_off[row + 1];
    }
    // The last repetition_context_size entries of the row (all when 0).
    const int64_t hw = o.repetition_context_size > 0
                           ? std::min<int64_t>(w, o.repetition_context_size)
                           : w;
    overrides(raw,
              hist + row * w + (w - hw),
              hw,
              bias_ids ? bias_ids + b0 : nullptr,
              bias_vals ? bias_vals + b0 : nullptr,
              b1 - b0,
              o,
              sc);
    const float* x = prepare(raw, n, masks ? masks + row * mw : nullptr, sc);
    float m;
    bool bad;
    scan_max(x, n, &m, &bad);
    if (bad || m == -kInf) {
      ids[row] = bad ? kErrorNonFinite : kErrorNoCandidate;
      continue;
    }
    int32_t id;
    if (o.temperature == 0.0f) {
      id = first_index_of(x, n, m);
    } else {
      Row r{x,
            n,
            m,
            o.temperature,
            1.0f / o.temperature,
            std::max<int64_t>(1, o.min_tokens_to_keep),
            sc.cand,
            sc.removed,
            sc.blocks.data()};
      top_k(r, o);
      top_p(r, o);
      min_p(r, o);
      xtc(r, o, uniform01(o.seed, o.counter, key_row, 1) < o.xtc_probability);
      id = draw(r, Race{o, key_row}, sc);
    }
    ids[row] = id;
    if (want_lp && o.logprobs >= 0) {
      const bool processed = !sc.overrides.empty() || masks != nullptr;
      logprobs(raw,
               processed,
               x,
               m,
               n,
               id,
               std::min(k, o.logprobs),
               sc,
               lp,
               top_ids,
               top_lps);
    }
  }
}

} // namespace

void sample(const std::vector<mx::array>& ins,
            std::vector<mx::array>& outs,
            const std::vector<SamplingOptions>& opts,
            bool per_row,
            bool has_mask) {
  const auto& logits = ins[0];
  switch (logits.dtype()) {
  case mx::float32:
    sample_rows(logits.data<float>(), ins, outs, opts, per_row, has_mask);
    break;
  case mx::float16:
    sample_rows(
        logits.data<mx::float16_t>(), ins, outs, opts, per_row, has_mask);
    break;
  case mx::bfloat16:
    sample_rows(
        logits.data<mx::bfloat16_t>(), ins, outs, opts, per_row, has_mask);
    break;
  default: {
    int32_t* ids = outs[0].data<int32_t>();
    std::fill(ids, ids + logits.shape(0), kErrorNonFinite);
  }
  }
}

} // namespace mlx_harmony_core::kernel
