// The CPU sampling kernel: one function per stage over a shared candidate set.
//
// A row goes through: prepare (token mask, logit bias, penalties) -> scan
// (max, NaN check) -> greedy, or top-k -> top-p -> min-p -> XTC -> draw ->
// logprobs. Adding a stage means one stage function, its option field and its
// test.
#pragma once

#include "sampling/sampling.h"

#include <vector>

namespace mlx_harmony_core::kernel {

// inputs: logits (B, V), history (B, W) int32, bias ids (N,) int32, bias
// values (N,) float32, with per_row the bias offsets (B + 1,) int32, and only
// with a mask: mask (B, ceil(V/32)) uint32. `options`: one for all rows, or
// (per_row) one per row, each row then keyed as row 0 of its own call.
// outputs: ids (B,) and with logprobs {logprob (B,), top ids, top logprobs}.
void sample(const std::vector<mx::array>& inputs,
            std::vector<mx::array>& outputs,
            const std::vector<SamplingOptions>& options,
            bool per_row,
            bool has_mask);

} // namespace mlx_harmony_core::kernel
