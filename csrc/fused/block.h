// A decoder block's decode step (a few query rows) on the CPU in two
// primitives around the KV cache update and the attention:
//   attn_in:      RMSNorm -> q/k/v quantized GEMV (+ bias) -> RoPE on q and k
//   attn_out_mlp: o-proj GEMV -> residual -> RMSNorm -> gate/up GEMV ->
//                 SwiGLU -> down GEMV -> residual
// instead of ~25 small MLX ops. The GEMVs are the quantized kernels of
// quant/matmul.h (each pass split over the thread pool once). Each op rounds
// at the points MLX's op-by-op graph does (results within float32 rounding
// of it) and returns that graph itself on a GPU stream or for what it does
// not take; the transforms (vjp, jvp, vmap) are that graph's.
#pragma once

#include "mlx/array.h"
#include "mlx/utils.h"

#include <optional>
#include <string>
#include <vector>

namespace mlx_harmony_core::fused {

namespace mx = mlx::core;

// y = x @ dequantize(w)^T (+ bias): a quantized Linear in MLX's layout.
struct QLinear {
  mx::array w;
  mx::array scales;
  std::optional<mx::array> biases; // affine modes
  std::optional<mx::array> bias;   // the layer's additive bias
  int group_size;
  int bits;
  std::string mode;
};

// RoPE as mx.fast.rope takes it (base or precomputed freqs).
struct RopeArgs {
  int dims;
  bool traditional;
  std::optional<float> base;
  float scale;
  std::optional<mx::array> freqs;
};

// Rows up to which the block ops run fused (decode, a few draft tokens).
constexpr int kMaxBlockRows = 16;

// x (B, L, D) -> q (B, n_heads, L, hd), k and v (B, n_kv_heads, L, hd):
// RMSNorm(x) * norm_w through q/k/v, RoPE (at offset + position) on q and k.
std::vector<mx::array> attn_in(const mx::array& x,
                               const mx::array& norm_w,
                               float eps,
                               const std::vector<QLinear>& qkv,
                               int n_heads,
                               int n_kv_heads,
                               const RopeArgs& rope,
                               const mx::array& offset,
                               mx::StreamOrDevice s = {});

// attn (B, H, L, hd) the attention's output, x (B, L, D) the block's input:
// h = x + o(attn); h + down(silu(gate(n)) * up(n)), n = RMSNorm(h) * norm_w.
mx::array attn_out_mlp(const mx::array& attn,
                       const mx::array& x,
                       const QLinear& o,
                       const mx::array& norm_w,
                       float eps,
                       const QLinear& gate,
                       const QLinear& up,
                       const QLinear& down,
                       mx::StreamOrDevice s = {});

} // namespace mlx_harmony_core::fused
