// The fused sampler: token mask, logits processors, filters and a seeded draw
// in one op.
//
// Order (HF / vLLM, temperature first): token mask -> logit bias ->
// repetition, presence and frequency penalties over the history window ->
// temperature (0 = greedy argmax of the processed logits) -> top-k -> top-p
// -> min-p -> XTC -> draw. The CPU kernel is sampling/kernel.cpp, the MLX-ops
// path sampling/ops.cpp.
#pragma once

#include "mlx/array.h"
#include "mlx/utils.h"

#include <cstdint>
#include <optional>
#include <vector>

namespace mlx_harmony_core {

namespace mx = mlx::core;

// Written in place of a token id; the Python layer raises ValueError for them
// (a kernel running on MLX's scheduler thread must not throw).
constexpr int32_t kErrorNonFinite = -1;   // NaN or +inf in a row
constexpr int32_t kErrorNoCandidate = -2; // every logit is -inf (or masked)

// The C++ side of SamplingParams (python/mlx_harmony_core/config.py holds the
// names, defaults and limits; sampling.py converts).
struct SamplingOptions {
  float temperature = 1.0f; // 0: greedy argmax
  int32_t top_k = 0;        // 0 or >= V: off; ties at the k-th value are kept
  float top_p = 1.0f;       // 1: off; ties at the boundary are kept
  float min_p = 0.0f;       // 0: off; relative to the top probability
  int32_t min_tokens_to_keep = 1;
  float xtc_probability = 0.0f;
  float xtc_threshold = 0.1f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  // Penalties look at the last this-many history entries (0: the whole row),
  // so rows of one batch can have windows of different sizes.
  int32_t repetition_context_size = 0;
  uint64_t seed = 0;
  uint64_t counter = 0;  // draw index: (seed, counter, row) keys the RNG
  int32_t logprobs = -1; // -1: none; n >= 0: chosen + top-n (raw logits)
};

// splitmix64's finalizer: a bijection with full avalanche (both sampler paths
// key their randomness through it).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Counter-based RNG: a uniform double in [0, 1) for (seed, counter, row,
// lane); the same in any process or thread.
double uniform01(uint64_t seed, uint64_t counter, uint64_t row, uint64_t lane);

// Throws std::invalid_argument with a message saying what to fix.
void validate(const SamplingOptions& o);

// logits: (V,) or (B, V) float32/float16/bfloat16. history: (B, W) int32
// padded with -1 (or empty). bias_ids/bias_values: (N,) int32 / float32.
// mask: (B, ceil(V/32)) uint32, bit set = allowed (none: every token).
// Returns {ids} or, with logprobs >= 0, {ids, logprob, top_ids, top_logprobs}.
// `kernel`: true = the CPU primitive, false = MLX ops (the GPU path),
// unset = by the stream's device.
std::vector<mx::array> sample(const mx::array& logits,
                              const mx::array& history,
                              const mx::array& bias_ids,
                              const mx::array& bias_values,
                              const std::optional<mx::array>& mask,
                              const SamplingOptions& options,
                              std::optional<bool> kernel,
                              mx::StreamOrDevice s = {});

// One call for a batch of independent requests: row b uses options[b], its
// logit bias is bias_ids/values[bias_offsets[b] : bias_offsets[b + 1]], and
// its draws are keyed by (seed, counter) alone, as if it ran as row 0 of its
// own call: a request draws the same tokens in any row, beside anyone.
// Logprobs outputs have max(options[b].logprobs) columns (rows asking fewer
// are padded with -1 / -inf; rows asking none get NaN as their logprob).
std::vector<mx::array> sample_rows(const mx::array& logits,
                                   const mx::array& history,
                                   const mx::array& bias_ids,
                                   const mx::array& bias_values,
                                   const mx::array& bias_offsets,
                                   const std::optional<mx::array>& mask,
                                   const std::vector<SamplingOptions>& options,
                                   std::optional<bool> kernel,
                                   mx::StreamOrDevice s = {});

} // namespace mlx_harmony_core
