#include "sampling.h"

#include "mlx/ops.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_harmony_core {

void init_sampling(nb::module_& m) {
  m.attr("ERROR_NON_FINITE") = kErrorNonFinite;
  m.attr("ERROR_NO_CANDIDATE") = kErrorNoCandidate;

  m.def(
      "sample",
      [](const mx::array& logits,
         std::optional<mx::array> history,
         std::optional<mx::array> bias_ids,
         std::optional<mx::array> bias_values,
         float temperature,
         int top_k,
         float top_p,
         float min_p,
         int min_tokens_to_keep,
         float xtc_probability,
         float xtc_threshold,
         float repetition_penalty,
         float presence_penalty,
         float frequency_penalty,
         uint64_t seed,
         uint64_t counter,
         int logprobs,
         std::optional<bool> kernel,
         mx::StreamOrDevice s) {
        SamplingOptions o;
        o.temperature = temperature;
        o.top_k = top_k;
        o.top_p = top_p;
        o.min_p = min_p;
        o.min_tokens_to_keep = min_tokens_to_keep;
        o.xtc_probability = xtc_probability;
        o.xtc_threshold = xtc_threshold;
        o.repetition_penalty = repetition_penalty;
        o.presence_penalty = presence_penalty;
        o.frequency_penalty = frequency_penalty;
        o.seed = seed;
        o.counter = counter;
        o.logprobs = logprobs;
        auto none_i = mx::zeros({0}, mx::int32);
        auto none_f = mx::zeros({0}, mx::float32);
        return sample(logits,
                      history.value_or(none_i),
                      bias_ids.value_or(none_i),
                      bias_values.value_or(none_f),
                      o,
                      kernel,
                      s);
      },
      "logits"_a,
      "history"_a = nb::none(),
      "bias_ids"_a = nb::none(),
      "bias_values"_a = nb::none(),
      nb::kw_only(),
      "temperature"_a = 1.0f,
      "top_k"_a = 0,
      "top_p"_a = 1.0f,
      "min_p"_a = 0.0f,
      "min_tokens_to_keep"_a = 1,
      "xtc_probability"_a = 0.0f,
      "xtc_threshold"_a = 0.1f,
      "repetition_penalty"_a = 1.0f,
      "presence_penalty"_a = 0.0f,
      "frequency_penalty"_a = 0.0f,
      "seed"_a = 0,
      "counter"_a = 0,
      "logprobs"_a = -1,
      "kernel"_a = nb::none(),
      "stream"_a = nb::none(),
      nb::sig(
          "def sample(logits: mlx.core.array, history: mlx.core.array | None = "
          "None, bias_ids: mlx.core.array | None = None, bias_values: "
          "mlx.core.array | None = None, *, temperature: float = 1.0, top_k: "
          "int = 0, top_p: float = 1.0, min_p: float = 0.0, "
          "min_tokens_to_keep: int = 1, xtc_probability: float = 0.0, "
          "xtc_threshold: float = 0.1, repetition_penalty: float = 1.0, "
          "presence_penalty: float = 0.0, frequency_penalty: float = 0.0, "
          "seed: int = 0, counter: int = 0, logprobs: int = -1, kernel: bool "
          "| None = None, stream: mlx.core.Stream | mlx.core.Device | None = "
          "None) -> list[mlx.core.array]"),
      R"(Draw one token id per row of ``logits`` ((V,) or (B, V)).

Order: logit bias -> repetition/presence/frequency penalties over ``history``
((B, W) int32, -1 = padding) -> temperature (0 = greedy) -> top-k -> top-p ->
min-p -> XTC -> draw, keyed by (seed, counter, row). Returns ``[ids]`` or,
with ``logprobs >= 0``, ``[ids, logprob, top_ids, top_logprobs]`` computed on
the raw logits. Rows with NaN/+inf get ERROR_NON_FINITE, all -inf rows
ERROR_NO_CANDIDATE. ``kernel``: True = CPU kernel, False = MLX ops (the GPU
path), None = by device.)");

  m.def("uniform01",
        &uniform01,
        "seed"_a,
        "counter"_a,
        "row"_a,
        "lane"_a = 0,
        "The sampler's counter-based uniform draw in [0, 1) (for tests).");
}

} // namespace mlx_harmony_core
