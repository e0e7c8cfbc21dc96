#include "sampling/sampling.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "primitive/cpu_primitive.h"
#include "sampling/kernel.h"
#include "sampling/ops.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace mlx_harmony_core {

double uniform01(uint64_t seed, uint64_t counter, uint64_t row, uint64_t lane) {
  uint64_t h = mix64(seed + 0x9e3779b97f4a7c15ULL);
  h = mix64(h ^ (counter * 0xd1b54a32d192ed03ULL + 0x632be59bd9b4e019ULL));
  h = mix64(h ^
            (row * 0x8cb92ba72f3d8dd7ULL + lane * 0x9e3779b97f4a7c15ULL + 1));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

// A last line of defence for callers of the C++ API; Python callers get the
// same limits from SamplingParams first.
void validate(const SamplingOptions& o) {
  auto fail = [](const std::string& m) { throw std::invalid_argument(m); };
  if (!(o.temperature >= 0.0f) || std::isinf(o.temperature)) {
    fail("temperature must be a finite number >= 0 (0 = greedy)");
  }
  if (o.top_k < 0) {
    fail("top_k must be >= 0 (0 = off)");
  }
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) {
    fail("top_p must be in (0, 1] (1 = off)");
  }
  if (!(o.min_p >= 0.0f && o.min_p <= 1.0f)) {
    fail("min_p must be in [0, 1] (0 = off)");
  }
  if (o.min_tokens_to_keep < 1) {
    fail("min_tokens_to_keep must be >= 1");
  }
  if (!(o.xtc_probability >= 0.0f && o.xtc_probability <= 1.0f)) {
    fail("xtc_probability must be in [0, 1]");
  }
  if (!(o.xtc_threshold >= 0.0f && o.xtc_threshold <= 0.5f)) {
    fail("xtc_threshold must be in [0, 0.5]");
  }
  if (!(o.repetition_penalty > 0.0f) || std::isinf(o.repetition_penalty)) {
    fail("repetition_penalty must be a finite number > 0 (1 = off)");
  }
  if (!std::isfinite(o.presence_penalty) ||
      !std::isfinite(o.frequency_penalty)) {
    fail("presence_penalty and frequency_penalty must be finite");
  }
  if (o.logprobs < -1) {
    fail("logprobs must be >= 0 (or -1 for none)");
  }
}

namespace {

// Checked, reshaped inputs shared by sample() and sample_rows().
struct Inputs {
  mx::array rows, hist;
  std::optional<mx::array> bits;
  int B, V;
  bool batched;
};

Inputs check_inputs(const mx::array& logits,
                    const mx::array& history,
                    const mx::array& bias_ids,
                    const mx::array& bias_values,
                    const std::optional<mx::array>& mask,
                    mx::Stream stream) {
  if (logits.ndim() != 1 && logits.ndim() != 2) {
    throw std::invalid_argument("logits must have shape (V,) or (B, V); got " +
                                std::to_string(logits.ndim()) + " dimensions");
  }
  const auto dt = logits.dtype();
  if (dt != mx::float32 && dt != mx::float16 && dt != mx::bfloat16) {
    throw std::invalid_argument(
        "logits must be float32, float16 or bfloat16; cast them with "
        ".astype(mx.float32)");
  }
  const int V = logits.shape(-1);
  if (V == 0) {
    throw std::invalid_argument("logits have an empty vocabulary axis (V = 0)");
  }
  const bool batched = logits.ndim() == 2;
  auto rows = batched ? logits : mx::reshape(logits, {1, V}, stream);
  const int B = rows.shape(0);

  auto hist = history;
  if (hist.size() == 0) {
    hist = mx::zeros({B, 0}, mx::int32, stream);
  } else if (hist.ndim() == 1 && !batched) {
    hist = mx::reshape(hist, {1, -1}, stream);
  }
  if (hist.ndim() != 2 || hist.shape(0) != B) {
    throw std::invalid_argument(
        "history must have one row per logits row: shape (B, W)");
  }
  if (hist.dtype() != mx::int32) {
    throw std::invalid_argument("history must be int32 token ids");
  }
  if (bias_ids.ndim() != 1 || bias_values.ndim() != 1 ||
      bias_ids.size() != bias_values.size()) {
    throw std::invalid_argument(
        "logit bias ids and values must be 1-D and of the same length");
  }
  if (bias_ids.size() > 0 &&
      (bias_ids.dtype() != mx::int32 || bias_values.dtype() != mx::float32)) {
    throw std::invalid_argument(
        "logit bias ids must be int32 and values float32");
  }
  // No mask adds no graph node: the common case pays nothing per step.
  std::optional<mx::array> bits;
  if (mask && mask->size() > 0) {
    const int words = (V + 31) / 32;
    bits = *mask;
    if (bits->ndim() == 1 && !batched) {
      bits = mx::reshape(*bits, {1, -1}, stream);
    }
    if (bits->ndim() != 2 || bits->shape(0) != B || bits->shape(1) != words) {
      throw std::invalid_argument(
          "the token mask must have shape (B, ceil(V / 32)) = (" +
          std::to_string(B) + ", " + std::to_string(words) +
          "): 32 tokens per uint32, bit set = allowed");
    }
    if (bits->dtype() != mx::uint32 && bits->dtype() != mx::int32) {
      throw std::invalid_argument("the token mask must be uint32 (or int32)");
    }
    bits = mx::view(*bits, mx::uint32, stream);
  }
  return {rows, hist, bits, B, V, batched};
}

void check_top_k(const SamplingOptions& o, int V) {
  if (o.top_k > V) {
    throw std::invalid_argument("top_k (" + std::to_string(o.top_k) +
                                ") is larger than the vocabulary (" +
                                std::to_string(V) + ")");
  }
}

// The CPU primitive's outputs: ids and, with k >= 0, the logprobs triple.
std::vector<mx::array> kernel_call(const Inputs& in,
                                   std::vector<mx::array> extra,
                                   std::vector<SamplingOptions> options,
                                   bool per_row,
                                   int k,
                                   mx::Stream stream) {
  if (stream.device != mx::Device::cpu) {
    throw std::invalid_argument("the sampling kernel runs on the CPU only");
  }
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, stream); };
  std::vector<mx::array> inputs{c(in.rows), c(in.hist)};
  for (auto& e : extra) {
    inputs.push_back(c(e));
  }
  if (in.bits) {
    inputs.push_back(c(*in.bits));
  }
  std::vector<mx::Shape> shapes{{in.B}};
  std::vector<mx::Dtype> dtypes{mx::int32};
  if (k >= 0) {
    shapes.insert(shapes.end(), {{in.B}, {in.B, k}, {in.B, k}});
    dtypes.insert(dtypes.end(), {mx::float32, mx::int32, mx::float32});
  }
  const bool has_mask = in.bits.has_value();
  return mx::array::make_arrays(
      std::move(shapes),
      dtypes,
      std::make_shared<CpuPrimitive>(
          stream,
          "MhcSample",
          "", // draws: never merged with another node
          nullptr,
          [o = std::move(options), per_row, has_mask](
              std::vector<mx::array>& ins, std::vector<mx::array>& outs) {
            kernel::sample(ins, outs, o, per_row, has_mask);
          }),
      inputs);
}

} // namespace

std::vector<mx::array> sample(const mx::array& logits,
                              const mx::array& history,
                              const mx::array& bias_ids,
                              const mx::array& bias_values,
                              const std::optional<mx::array>& mask,
                              const SamplingOptions& options,
                              std::optional<bool> kernel,
                              mx::StreamOrDevice s) {
  validate(options);
  auto stream = mx::to_stream(s);
  auto in = check_inputs(logits, history, bias_ids, bias_values, mask, stream);
  check_top_k(options, in.V);
  std::vector<mx::array> outs;
  if (kernel.value_or(stream.device == mx::Device::cpu)) {
    outs = kernel_call(in,
                       {mx::astype(bias_ids, mx::int32, stream),
                        mx::astype(bias_values, mx::float32, stream)},
                       {options},
                       false,
                       options.logprobs,
                       stream);
  } else {
    outs = ops::sample(
        in.rows, in.hist, bias_ids, bias_values, in.bits, options, stream);
  }
  if (!in.batched) {
    outs[0] = mx::reshape(outs[0], {}, stream);
    if (outs.size() > 1) {
      outs[1] = mx::reshape(outs[1], {}, stream);
      outs[2] = mx::reshape(outs[2], {options.logprobs}, stream);
      outs[3] = mx::reshape(outs[3], {options.logprobs}, stream);
    }
  }
  return outs;
}

std::vector<mx::array> sample_rows(const mx::array& logits,
                                   const mx::array& history,
                                   const mx::array& bias_ids,
                                   const mx::array& bias_values,
                                   const mx::array& bias_offsets,
                                   const std::optional<mx::array>& mask,
                                   const std::vector<SamplingOptions>& options,
                                   std::optional<bool> kernel,
                                   mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (logits.ndim() != 2) {
    throw std::invalid_argument(
        "sample_rows needs logits of shape (B, V), one row per request");
  }
  auto in = check_inputs(logits, history, bias_ids, bias_values, mask, stream);
  if (static_cast<int>(options.size()) != in.B) {
    throw std::invalid_argument(
        "sample_rows needs one SamplingOptions per logits row (" +
        std::to_string(in.B) + "), got " + std::to_string(options.size()));
  }
  int k = -1;
  for (auto& o : options) {
    validate(o);
    check_top_k(o, in.V);
    k = std::max(k, o.logprobs);
  }
  if (bias_offsets.ndim() != 1 || bias_offsets.size() != in.B + 1 ||
      bias_offsets.dtype() != mx::int32) {
    throw std::invalid_argument(
        "bias_offsets must be int32 of shape (B + 1,): row b's bias is "
        "bias_ids[offsets[b] : offsets[b + 1]]");
  }
  if (kernel.value_or(stream.device == mx::Device::cpu)) {
    return kernel_call(in,
                       {mx::astype(bias_ids, mx::int32, stream),
                        mx::astype(bias_values, mx::float32, stream),
                        bias_offsets},
                       options,
                       true,
                       k,
                       stream);
  }
  // The MLX-ops path, row by row: each row is its own call (so its own RNG
  // key), which is what the kernel's per-row keying reproduces.
  mx::eval(std::vector<mx::array>{bias_offsets});
  const int32_t* off = bias_offsets.data<int32_t>();
  std::vector<std::vector<mx::array>> parts(k >= 0 ? 4 : 1);
  for (int b = 0; b < in.B; ++b) {
    const auto& o = options[b];
    // ops::sample keeps the last repetition_context_size entries itself.
    auto row = mx::slice(in.rows, {b, 0}, {b + 1, in.V}, stream);
    auto hist = mx::slice(in.hist, {b, 0}, {b + 1, in.hist.shape(1)}, stream);
    auto ids = mx::slice(bias_ids, {off[b]}, {off[b + 1]}, stream);
    auto vals = mx::slice(bias_values, {off[b]}, {off[b + 1]}, stream);
    std::optional<mx::array> bits;
    if (in.bits) {
      bits = mx::slice(*in.bits, {b, 0}, {b + 1, in.bits->shape(1)}, stream);
    }
    auto one = o;
    one.logprobs = k >= 0 ? std::max(o.logprobs, 0) : -1;
    auto outs = ops::sample(row, hist, ids, vals, bits, one, stream);
    if (k >= 0 && o.logprobs < k) {
      // Pad to the batch's width, as the kernel does.
      const int have = one.logprobs, pad = k - have;
      outs[1] = o.logprobs < 0 ? mx::full({1}, std::nanf(""), stream) : outs[1];
      outs[2] = mx::concatenate(
          {mx::slice(outs[2], {0, 0}, {1, have}, stream),
           mx::full({1, pad}, mx::array(-1, mx::int32), stream)},
          1,
          stream);
      outs[3] = mx::concatenate(
          {mx::slice(outs[3], {0, 0}, {1, have}, stream),
           mx::full({1, pad}, mx::array(-INFINITY, mx::float32), stream)},
          1,
          stream);
    }
    for (size_t i = 0; i < parts.size(); ++i) {
      parts[i].push_back(outs[i]);
    }
  }
  std::vector<mx::array> outs;
  for (auto& p : parts) {
    outs.push_back(mx::concatenate(p, 0, stream));
  }
  return outs;
}

} // namespace mlx_harmony_core
