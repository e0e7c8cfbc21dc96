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

#include <memory>
#include <optional>
#include <string>
#include <utility>
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
  // biases == -zero * scales exactly (with_zero; 0: not known to): the
  // kernels then read no bias stream (GGUF's Q4_0/Q5_0/Q8_0/Q3_K/Q6_K).
  int zero = 0;
};

// `l` with `zero` set where its evaluated biases are exactly -z * scales for
// one z in {4, 8, 16, 32, 128} (one pass over them: for weights kept across
// steps, e.g. a FusedBlock's, not per call).
QLinear with_zero(QLinear l);

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

uint64_t next_layer_id();
struct StackMemo;

// One llama-style decoder block's weights and settings (attn_in's and
// attn_out_mlp's arguments, the attention's scale).
struct Layer {
  mx::array norm1;
  float eps1;
  std::vector<QLinear> qkv;
  int heads, kv_heads;
  RopeArgs rope;
  QLinear o;
  mx::array norm2;
  float eps2;
  QLinear gate, up, down;
  float scale;
  // Distinct for every Layer made (copies share it): what a memo of plans
  // keys on (an address may be reused).
  uint64_t id = next_layer_id();
  // stack_step's plan for the stack this layer is the first of (block.cpp);
  // it lives (with the weights it holds) as long as the layer.
  mutable std::shared_ptr<StackMemo> memo;
};

// Every layer's step over x (B, L, D), L <= kMaxBlockRows, as ONE primitive:
// RoPE at `positions` (int32, scalar or (B,)); layer i writes its keys and
// values of the L rows into bufs[i] (B, kv_heads, capacity, head_dim, x's
// dtype; capacity >= at + L) at column `at` and attends columns [lo, at + L)
// with `mask_mode` ("", "causal" or "array": `mask`, broadcastable to
// (B, heads, L, at + L - lo), bool or additive); each part computed as
// attn_in, the fused attention and attn_out_mlp compute it. Returns {h,
// keys_0, values_0, keys_1, ...}: the last layer's output and every buffer
// updated (in place where MLX can donate it; `views_below`: every view of a
// buffer's data sees columns below `at` only, so a buffer whose data views
// share is still updated in place); nothing where the fused path
// does not take the arguments (run the layers one by one then). Inference
// only: the op has no transforms and runs on a CPU stream.
std::optional<std::vector<mx::array>>
stack_step(const std::vector<const Layer*>& layers,
           const mx::array& x,
           const mx::array& positions,
           const std::vector<std::pair<mx::array, mx::array>>& bufs,
           int at,
           int lo,
           const std::string& mask_mode,
           const std::optional<mx::array>& mask,
           bool views_below,
           mx::StreamOrDevice s = {});

// Key/value buffers (holding rows) stack steps have copied because MLX
// could not update them in place (something else held them): diagnostics.
int64_t stack_copies();

} // namespace mlx_harmony_core::fused
