// The fused sampler: one pass over the vocabulary per row, seeded draws.
#pragma once

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

#include <cstdint>

namespace mlx_harmony_core {

namespace mx = mlx::core;

// Error codes written in place of a token id; the Python layer turns them
// into ValueError (a kernel running on MLX's scheduler must not throw).
constexpr int32_t kErrorNonFinite = -1;   // NaN or +inf in a row
constexpr int32_t kErrorNoCandidate = -2; // every logit is -inf

struct SamplingOptions {
  float temperature = 1.0f; // 0: greedy argmax
  uint64_t seed = 0;
  uint64_t counter = 0; // draw index: (seed, counter, row) keys the RNG
};

// Counter-based RNG: a uniform double in [0, 1) for (seed, counter, row,
// lane), the same in any process or thread.
double uniform01(uint64_t seed, uint64_t counter, uint64_t row, uint64_t lane);

// Draws one token per row of `logits` ((V,) or (B, V), float32, float16 or
// bfloat16). Returns int32 ids of shape () or (B,).
mx::array sample(const mx::array &logits,
                 const SamplingOptions &options,
                 mx::StreamOrDevice s = {});

class Sample : public mx::UnaryPrimitive {
public:
  Sample(mx::Stream stream, SamplingOptions options)
      : mx::UnaryPrimitive(stream), options_(options) {}

  void eval_cpu(const std::vector<mx::array> &inputs, mx::array &out) override;
  void eval_gpu(const std::vector<mx::array> &inputs, mx::array &out) override;

  const char *name() const override {
    return "MhcSample";
  }
  bool is_equivalent(const mx::Primitive &other) const override;
  std::vector<mx::Shape>
  output_shapes(const std::vector<mx::array> &inputs) override;

private:
  SamplingOptions options_;
};

} // namespace mlx_harmony_core
