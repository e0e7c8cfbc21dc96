// The sampler built from MLX ops (the GPU path, or on request on the CPU):
// the same stages and distribution as the CPU kernel, with no full sort.
#pragma once

#include "sampling/sampling.h"

namespace mlx_harmony_core::ops {

// logits (B, V); history (B, W) int32; bias (N,); mask (B, ceil(V/32))
// uint32 or none. Returns what sample() documents.
std::vector<mx::array> sample(const mx::array& logits,
                              const mx::array& history,
                              const mx::array& bias_ids,
                              const mx::array& bias_values,
                              const std::optional<mx::array>& mask,
                              const SamplingOptions& o,
                              mx::Stream s);

} // namespace mlx_harmony_core::ops
