#include "sampling.h"

#include "sampling/kernel.h"
#include "sampling/ops.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

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

std::vector<mx::array> sample(const mx::array& logits,
                              const mx::array& history,
                              const mx::array& bias_ids,
                              const mx::array& bias_values,
                              const std::optional<mx::array>& mask,
                              const SamplingOptions& options,
                              std::optional<bool> kernel,
                              mx::StreamOrDevice s) {
  validate(options);
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
  if (options.top_k > V) {
    throw std::invalid_argument("top_k (" + std::to_string(options.top_k) +
                                ") is larger than the vocabulary (" +
                                std::to_string(V) + ")");
  }
  auto stream = mx::to_stream(s);
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

  const bool on_cpu = stream.device == mx::Device::cpu;
  std::vector<mx::array> outs;
  if (kernel.value_or(on_cpu)) {
    if (!on_cpu) {
      throw std::invalid_argument("the sampling kernel runs on the CPU only");
    }
    auto c = [&](const mx::array& a) { return mx::contiguous(a, false, stream); };
    std::vector<mx::array> inputs{c(rows),
                                  c(hist),
                                  c(mx::astype(bias_ids, mx::int32, stream)),
                                  c(mx::astype(bias_values, mx::float32, stream))};
    if (bits) {
      inputs.push_back(c(*bits));
    }
    std::vector<mx::Shape> shapes{{B}};
    std::vector<mx::Dtype> dtypes{mx::int32};
    if (options.logprobs >= 0) {
      shapes.insert(shapes.end(),
                    {{B}, {B, options.logprobs}, {B, options.logprobs}});
      dtypes.insert(dtypes.end(), {mx::float32, mx::int32, mx::float32});
    }
    outs = mx::array::make_arrays(std::move(shapes),
                                  dtypes,
                                  std::make_shared<Sample>(stream, options),
                                  inputs);
  } else {
    outs = ops::sample(rows, hist, bias_ids, bias_values, bits, options, stream);
  }
  if (!batched) {
    outs[0] = mx::reshape(outs[0], {}, stream);
    if (outs.size() > 1) {
      outs[1] = mx::reshape(outs[1], {}, stream);
      outs[2] = mx::reshape(outs[2], {options.logprobs}, stream);
      outs[3] = mx::reshape(outs[3], {options.logprobs}, stream);
    }
  }
  return outs;
}

void Sample::eval_cpu(const std::vector<mx::array>& inputs,
                      std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    encoder.set_output_array(out);
  }
  std::vector<mx::array> ins, outs;
  for (auto& in : inputs) {
    ins.push_back(mx::array::unsafe_weak_copy(in));
  }
  for (auto& out : outputs) {
    outs.push_back(mx::array::unsafe_weak_copy(out));
  }
  encoder.dispatch(
      [ins = std::move(ins), outs = std::move(outs), o = options_]() mutable {
        kernel::sample(ins, outs, o);
      });
}

void Sample::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "MhcSample runs on the CPU; on a GPU stream sample() builds MLX ops");
}

} // namespace mlx_harmony_core
