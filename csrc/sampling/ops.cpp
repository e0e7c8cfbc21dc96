#include "sampling/ops.h"

#include "mlx/ops.h"
#include "mlx/random.h"

#include <cmath>
#include <limits>

namespace mlx_harmony_core::ops {

namespace {

using namespace mx;

constexpr float kInf = std::numeric_limits<float>::infinity();

// Each stage narrows `keep` (B, V) over the scaled logits `z` = x / T.
struct Rows {
  array x, z, keep, xmax, top_min;
  int B, V, keep_min;
  float T;
  Stream s;

  array kth_value(int k) const { // the k-th largest logit of each row
    return min(topk(x, std::min(k, V), -1, s), -1, true, s);
  }
};

// -- stage: prepare: token mask, logit bias, penalties ----------------------
array prepare(array x,
              const array& history,
              const array& bias_ids,
              const array& bias_values,
              const std::optional<array>& mask,
              const SamplingOptions& o,
              Stream s) {
  const int B = x.shape(0), V = x.shape(1);
  if (bias_ids.size() > 0) {
    auto dense = scatter_add(zeros({V}, float32, s),
                             {bias_ids},
                             reshape(bias_values, {-1, 1}, s),
                             {0},
                             s);
    x = add(x, dense, s);
  }
  const bool penalties = o.repetition_penalty != 1.0f ||
                         o.presence_penalty != 0.0f ||
                         o.frequency_penalty != 0.0f;
  if (penalties && history.size() > 0) {
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
  if (mask) {
    // Bit (i % 32) of word i / 32 allows token i.
    auto ids = arange(V, int32, s);
    auto words = take(*mask, floor_divide(ids, array(32), s), 1, s);
    auto shift = astype(remainder(ids, array(32), s), uint32, s);
    auto bit = bitwise_and(right_shift(words, shift, s), array(1u, uint32), s);
    x = where(astype(bit, bool_, s), x, array(-kInf), s);
  }
  return x;
}

// -- stage: top-k -----------------------------------------------------------
void top_k(Rows& r, const SamplingOptions& o) {
  if (o.top_k > 0 && std::max(o.top_k, r.keep_min) < r.V) {
    auto kth = r.kth_value(std::max(o.top_k, r.keep_min));
    r.keep = logical_and(r.keep, greater_equal(r.x, kth, r.s), r.s);
  }
}

// -- stage: top-p -----------------------------------------------------------
// Bisection on the value threshold: the largest t whose top set {z >= t}
// still holds top_p of the kept mass.
void top_p(Rows& r, const SamplingOptions& o) {
  if (!(o.top_p < 1.0f)) {
    return;
  }
  auto s = r.s;
  auto zmax = max(r.z, -1, true, s);
  auto p = where(r.keep, exp(subtract(r.z, zmax, s), s), array(0.0f), s);
  auto need = multiply(sum(p, -1, true, s), array(o.top_p), s);
  auto lo = min(where(r.keep, r.z, array(kInf), s), -1, true, s);
  auto hi = add(zmax, array(1.0f), s);
  for (int it = 0; it < 40; ++it) {
    auto mid = multiply(add(lo, hi, s), array(0.5f), s);
    auto mass =
        sum(where(greater_equal(r.z, mid, s), p, array(0.0f), s), -1, true, s);
    auto ok = greater_equal(mass, need, s);
    lo = where(ok, mid, lo, s);
    hi = where(ok, hi, mid, s);
  }
  auto nucleus = logical_or(
      greater_equal(r.z, lo, s), greater_equal(r.x, r.top_min, s), s);
  r.keep = logical_and(r.keep, nucleus, s);
}

// -- stage: min-p -----------------------------------------------------------
// Top-k and min-p compare logits, not logits / T: the same order, and no
// float32 underflow merging distinct logits.
void min_p(Rows& r, const SamplingOptions& o) {
  if (o.min_p > 0.0f) {
    auto cut = add(r.xmax, array(std::log(o.min_p) * r.T), r.s);
    auto ok = greater_equal(r.x, minimum(cut, r.top_min, r.s), r.s);
    r.keep = logical_and(r.keep, ok, r.s);
  }
}

// -- stage: XTC -------------------------------------------------------------
void xtc(Rows& r, const SamplingOptions& o, const array& key) {
  if (!(o.xtc_probability > 0.0f)) {
    return;
  }
  auto s = r.s;
  auto ninf = array(-kInf, float32);
  auto p = softmax(where(r.keep, r.z, ninf, s), std::vector<int>{-1}, true, s);
  auto above = greater(p, array(o.xtc_threshold), s);
  auto least = min(where(above, p, array(kInf), s), -1, true, s);
  auto drop = logical_and(above, greater(p, least, s), s);
  auto coin =
      less(random::uniform(array(0.0f), array(1.0f), {r.B, 1}, float32, key, s),
           array(o.xtc_probability),
           s);
  r.keep = logical_and(r.keep, logical_not(logical_and(drop, coin, s), s), s);
}

// -- stage: logprobs (of the raw logits) ------------------------------------
void logprobs(const array& raw,
              const array& ids,
              const SamplingOptions& o,
              Stream s,
              std::vector<array>& outs) {
  const int B = raw.shape(0), V = raw.shape(1);
  auto lse = logsumexp(raw, std::vector<int>{-1}, true, s);
  auto safe = reshape(maximum(ids, array(0), s), {B, 1}, s);
  outs.push_back(
      reshape(subtract(take_along_axis(raw, safe, -1, s), lse, s), {B}, s));
  if (o.logprobs == 0) {
    outs.push_back(zeros({B, 0}, int32, s));
    outs.push_back(zeros({B, 0}, float32, s));
    return;
  }
  const int k = std::min(o.logprobs, V);
  auto part =
      slice(argpartition(negative(raw, s), k - 1, -1, s), {0, 0}, {B, k}, s);
  auto vals = take_along_axis(raw, part, -1, s);
  auto order = argsort(negative(vals, s), -1, s);
  auto top_ids = astype(take_along_axis(part, order, -1, s), int32, s);
  auto top_lp = subtract(take_along_axis(vals, order, -1, s), lse, s);
  if (k < o.logprobs) {
    top_ids =
        concatenate({top_ids, full({B, o.logprobs - k}, array(-1), s)}, -1, s);
    top_lp = concatenate(
        {top_lp, full({B, o.logprobs - k}, array(-kInf), s)}, -1, s);
  }
  outs.push_back(top_ids);
  outs.push_back(top_lp);
}

} // namespace

std::vector<array> sample(const array& logits,
                          const array& history,
                          const array& bias_ids,
                          const array& bias_values,
                          const std::optional<array>& mask,
                          const SamplingOptions& o,
                          Stream s) {
  const int B = logits.shape(0), V = logits.shape(1);
  auto raw = astype(logits, float32, s);
  const int W = history.ndim() == 2 ? history.shape(1) : 0;
  auto hist = history;
  if (o.repetition_context_size > 0 && o.repetition_context_size < W) {
    hist = slice(history, {0, W - o.repetition_context_size}, {B, W}, s);
  }
  auto x = prepare(raw, hist, bias_ids, bias_values, mask, o, s);
  auto ninf = array(-kInf, float32);
  auto bad =
      any(logical_or(isnan(x, s), equal(x, array(kInf), s), s), -1, false, s);
  auto none = all(equal(x, ninf, s), -1, false, s);

  auto keys = random::split(random::key(mix64(o.seed ^ mix64(o.counter))), s);
  array ids = argmax(x, -1, false, s);
  if (o.temperature != 0.0f) {
    const int keep_min = std::max(1, o.min_tokens_to_keep);
    auto z = multiply(x, array(1.0f / o.temperature), s);
    auto xmax = max(x, -1, true, s);
    Rows r{x,
           z,
           greater(z, ninf, s),
           xmax,
           xmax,
           B,
           V,
           keep_min,
           o.temperature,
           s};
    if (keep_min > 1) {
      r.top_min = r.kth_value(keep_min);
    }
    top_k(r, o);
    top_p(r, o);
    min_p(r, o);
    xtc(r, o, keys.second);
    auto g = random::gumbel({B, V}, float32, keys.first, s);
    ids = argmax(add(where(r.keep, z, ninf, s), g, s), -1, false, s);
  }
  ids = astype(ids, int32, s);
  ids = where(bad,
              array(kErrorNonFinite),
              where(none, array(kErrorNoCandidate), ids, s),
              s);
  std::vector<array> outs{ids};
  if (o.logprobs >= 0) {
    logprobs(raw, ids, o, s, outs);
  }
  return outs;
}

} // namespace mlx_harmony_core::ops
