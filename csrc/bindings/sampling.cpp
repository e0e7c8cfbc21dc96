#include "sampling.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_harmony_core {

void init_sampling(nb::module_ &m) {
  m.attr("ERROR_NON_FINITE") = kErrorNonFinite;
  m.attr("ERROR_NO_CANDIDATE") = kErrorNoCandidate;

  m.def(
      "sample",
      [](const mx::array &logits,
         float temperature,
         uint64_t seed,
         uint64_t counter,
         mx::StreamOrDevice s) {
        SamplingOptions o;
        o.temperature = temperature;
        o.seed = seed;
        o.counter = counter;
        return sample(logits, o, s);
      },
      "logits"_a,
      nb::kw_only(),
      "temperature"_a = 1.0f,
      "seed"_a = 0,
      "counter"_a = 0,
      "stream"_a = nb::none(),
      nb::sig("def sample(logits: mlx.core.array, *, temperature: float = 1.0, "
              "seed: int = 0, counter: int = 0, "
              "stream: mlx.core.Stream | mlx.core.Device | None = None) "
              "-> mlx.core.array"),
      R"(Draw one token id per row of ``logits`` ((V,) or (B, V)).

Temperature 0 is greedy argmax. The draw is keyed by (seed, counter, row), so
the same inputs give the same ids in any process. Rows whose logits contain
NaN or +inf get ERROR_NON_FINITE; rows that are all -inf ERROR_NO_CANDIDATE.)");

  m.def("uniform01",
        &uniform01,
        "seed"_a,
        "counter"_a,
        "row"_a,
        "lane"_a = 0,
        "The sampler's counter-based uniform draw in [0, 1) (for tests).");
}

} // namespace mlx_harmony_core
