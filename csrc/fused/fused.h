// Fused CPU primitives for the decode step: RMSNorm (+ weight), RoPE and
// attention of a few query rows over a KV cache (masks, sinks, GQA). Each op
// takes mx.fast's arguments, builds one primitive on a CPU stream and returns
// MLX's own op anywhere else (a GPU stream, shapes or dtypes it does not take).
// The primitives' transforms (vjp, jvp, vmap) are MLX's op's.
#pragma once

#include "mlx/array.h"
#include "mlx/utils.h"

#include <optional>
#include <string>

namespace mlx_harmony_core::fused {

namespace mx = mlx::core;

// Query rows a task of our attention takes: a decode step's rows are one
// block; a prompt's blocks spread over the threads. Prompts run here too:
// MLX's CPU op (GEMMs, then a softmax with a scalar exp on one thread) spent
// ~1 s of a 3.7-s 480-token SmolLM2 prefill in that softmax.
constexpr int kQueryBlock = 16;

mx::array rms_norm(const mx::array& x,
                   const std::optional<mx::array>& weight,
                   float eps,
                   mx::StreamOrDevice s = {});

// silu(gate) * x as mlx-lm's swiglu computes it (gate and x of one shape).
mx::array
swiglu(const mx::array& gate, const mx::array& x, mx::StreamOrDevice s = {});

// offset: a scalar or one per batch row (int32 or another integer type).
mx::array rope(const mx::array& x,
               int dims,
               bool traditional,
               std::optional<float> base,
               float scale,
               const mx::array& offset,
               const std::optional<mx::array>& freqs,
               mx::StreamOrDevice s = {});

// mask_mode: "" (none), "causal" or "array" (mask_arr: bool or additive).
mx::array sdpa(const mx::array& q,
               const mx::array& k,
               const mx::array& v,
               float scale,
               const std::string& mask_mode,
               const std::optional<mx::array>& mask_arr,
               const std::optional<mx::array>& sinks,
               mx::StreamOrDevice s = {});

} // namespace mlx_harmony_core::fused
