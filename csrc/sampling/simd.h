// SIMD helpers of the CPU sampling kernel: one pass each over a row of logits.
//
// Plain loops over 8-float vectors vectorize on any ISA; on x86-64 Linux the
// hot ones get an AVX2 clone picked at load time, with results identical to
// the baseline clone (fixed 8-lane sums, no FMA contraction).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace mlx_harmony_core::simd {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr int kLanes = 8;
constexpr int64_t kBlock = 512; // granularity of the per-block mass sums

// A token that survives the filters so far, with its weight once known.
struct Cand {
  float x;
  int32_t id;
  double w; // exp((x - max) / T), filled when needed
};

inline bool higher(const Cand& a, const Cand& b) {
  return a.x > b.x || (a.x == b.x && a.id < b.id);
}

// Cut levels below the max (in units the caller chooses): one profile pass
// measures how many ids and how much mass lie above each.
constexpr int kLevels = 8;
constexpr float kLevelDeltas[kLevels] = {
    0.5f, 1.f, 2.f, 3.f, 4.5f, 7.f, 10.f, 16.f};

// exp(x) for x <= ~0 with a few ulp error; exactly 0 below -87.
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

// The row's max, and whether it holds NaN or +inf.
void scan_max(const float* x, int64_t n, float* m_out, bool* bad);

// Per-block sums of exp((x - m) * s) into `blocks`; returns their total.
double
sum_exp_blocks(const float* x, int64_t n, float m, float s, float* blocks);

// Every id with x >= cut (and x > -inf) into `out`.
void collect(const float* x, int64_t n, float cut, std::vector<Cand>& out);

// How many ids lie at or above each cut level m - delta * unit (top-k).
void profile_counts(
    const float* x, int64_t n, float m, float unit, int64_t* counts);

// Mass exp((x - m) * s) at or above each cut level into `mass`; returns the
// total (top-p).
double profile_mass(
    const float* x, int64_t n, float m, float s, float unit, double* mass);

// The first index holding `v` (0 if none).
int32_t first_index_of(const float* x, int64_t n, float v);

// Sets x[i] = -inf wherever bit i of `mask` is clear (32 ids per word, LSB
// first: the llguidance / xgrammar layout).
void apply_mask(float* x, int64_t n, const uint32_t* mask);

} // namespace mlx_harmony_core::simd
