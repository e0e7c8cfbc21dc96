#include "sampling/sampling.h"

#include "mlx/ops.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_harmony_core {

void init_sampling(nb::module_& m) {
  m.attr("ERROR_NON_FINITE") = kErrorNonFinite;
  m.attr("ERROR_NO_CANDIDATE") = kErrorNoCandidate;

  // Fields are bound by name; SamplingParams (Python) is where their limits
  // and help live, and sampling.py fills this struct from it.
  nb::class_<SamplingOptions>(
      m,
      "SamplingOptions",
      "The fused sampler's options (filled from SamplingParams by "
      "mlx_harmony_core.sampling).")
      .def(nb::init<>())
      .def_rw("temperature", &SamplingOptions::temperature)
      .def_rw("top_k", &SamplingOptions::top_k)
      .def_rw("top_p", &SamplingOptions::top_p)
      .def_rw("min_p", &SamplingOptions::min_p)
      .def_rw("min_tokens_to_keep", &SamplingOptions::min_tokens_to_keep)
      .def_rw("xtc_probability", &SamplingOptions::xtc_probability)
      .def_rw("xtc_threshold", &SamplingOptions::xtc_threshold)
      .def_rw("repetition_penalty", &SamplingOptions::repetition_penalty)
      .def_rw("presence_penalty", &SamplingOptions::presence_penalty)
      .def_rw("frequency_penalty", &SamplingOptions::frequency_penalty)
      .def_rw("repetition_context_size",
              &SamplingOptions::repetition_context_size)
      .def_rw("seed", &SamplingOptions::seed)
      .def_rw("counter", &SamplingOptions::counter)
      .def_rw("logprobs", &SamplingOptions::logprobs)
      .def("__copy__", [](const SamplingOptions& o) { return o; });

  m.def(
      "sample",
      [](const mx::array& logits,
         std::optional<mx::array> history,
         std::optional<mx::array> bias_ids,
         std::optional<mx::array> bias_values,
         std::optional<SamplingOptions> options,
         std::optional<mx::array> mask,
         std::optional<bool> kernel,
         mx::StreamOrDevice s,
         nb::kwargs overrides) {
        SamplingOptions o = options.value_or(SamplingOptions{});
        if (overrides.size() > 0) {
          // Keyword overrides go through the bound fields: one list of names.
          nb::object view = nb::cast(&o, nb::rv_policy::reference);
          for (auto [key, value] : overrides) {
            if (!nb::hasattr(view, key)) {
              throw nb::type_error(("sample() got an unknown option '" +
                                    nb::cast<std::string>(key) + "'")
                                       .c_str());
            }
            nb::setattr(view, key, value);
          }
        }
        auto none_i = mx::zeros({0}, mx::int32);
        auto none_f = mx::zeros({0}, mx::float32);
        return sample(logits,
                      history.value_or(none_i),
                      bias_ids.value_or(none_i),
                      bias_values.value_or(none_f),
                      mask,
                      o,
                      kernel,
                      s);
      },
      "logits"_a,
      "history"_a = nb::none(),
      "bias_ids"_a = nb::none(),
      "bias_values"_a = nb::none(),
      "options"_a = nb::none(),
      nb::kw_only(),
      "mask"_a = nb::none(),
      "kernel"_a = nb::none(),
      "stream"_a = nb::none(),
      "overrides"_a,
      R"(Draw one token id per row of ``logits`` ((V,) or (B, V)).

Order: token ``mask`` ((B, ceil(V/32)) uint32, bit set = allowed) -> logit
bias -> repetition/presence/frequency penalties over ``history`` ((B, W)
int32, -1 = padding) -> temperature (0 = greedy) -> top-k -> top-p -> min-p
-> XTC -> draw, keyed by (seed, counter, row). ``options`` is a
SamplingOptions; keyword arguments override its fields by name. Returns
``[ids]`` or, with ``logprobs >= 0``, ``[ids, logprob, top_ids,
top_logprobs]`` computed on the raw logits. Rows with NaN/+inf get
ERROR_NON_FINITE, rows with no allowed finite logit ERROR_NO_CANDIDATE.
``kernel``: True = CPU kernel, False = MLX ops (the GPU path), None = by
device.)");

  m.def(
      "sample_rows",
      [](const mx::array& logits,
         std::optional<mx::array> history,
         std::optional<mx::array> bias_ids,
         std::optional<mx::array> bias_values,
         std::optional<mx::array> bias_offsets,
         const std::vector<SamplingOptions>& options,
         std::optional<mx::array> mask,
         std::optional<bool> kernel,
         mx::StreamOrDevice s) {
        const int B = logits.ndim() == 2 ? logits.shape(0) : 0;
        return sample_rows(logits,
                           history.value_or(mx::zeros({0}, mx::int32)),
                           bias_ids.value_or(mx::zeros({0}, mx::int32)),
                           bias_values.value_or(mx::zeros({0}, mx::float32)),
                           bias_offsets.value_or(mx::zeros({B + 1}, mx::int32)),
                           mask,
                           options,
                           kernel,
                           s);
      },
      "logits"_a,
      "history"_a,
      "bias_ids"_a,
      "bias_values"_a,
      "bias_offsets"_a,
      "options"_a,
      nb::kw_only(),
      "mask"_a = nb::none(),
      "kernel"_a = nb::none(),
      "stream"_a = nb::none(),
      R"(Draw one token per row of ``logits`` (B, V), each row with its own
SamplingOptions (``options``, one per row): a batch of independent requests
in one call. Row b's logit bias is ``bias_ids[bias_offsets[b] :
bias_offsets[b + 1]]`` (``bias_offsets``: (B + 1,) int32); its penalties
look at the last ``repetition_context_size`` entries of its history row;
its draws are keyed by (seed, counter) as row 0 of a call of its own, so a
request gets the same tokens in any row and beside anyone. Returns what
``sample`` does, the logprobs outputs ``max(logprobs)`` wide.)");

  m.def("uniform01",
        &uniform01,
        "seed"_a,
        "counter"_a,
        "row"_a,
        "lane"_a = 0,
        "The sampler's counter-based uniform draw in [0, 1) (for tests).");
}

} // namespace mlx_harmony_core
