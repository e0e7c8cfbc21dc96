#include "fused/fused.h"

#include "mlx/ops.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include <variant>

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_harmony_core {

namespace mx = mlx::core;

void init_fused(nb::module_& m) {
  m.def("rms_norm",
        &fused::rms_norm,
        "x"_a,
        "weight"_a.none(),
        "eps"_a,
        nb::kw_only(),
        "stream"_a = nb::none(),
        "``mx.fast.rms_norm`` as one fused primitive on a CPU stream (MLX's "
        "op elsewhere).");
  m.def(
      "rope",
      [](const mx::array& x,
         int dims,
         bool traditional,
         std::optional<float> base,
         float scale,
         const std::variant<int, mx::array>& offset,
         const std::optional<mx::array>& freqs,
         mx::StreamOrDevice s) {
        const mx::array off = std::holds_alternative<int>(offset)
                                  ? mx::array(std::get<int>(offset), mx::int32)
                                  : std::get<mx::array>(offset);
        return fused::rope(x, dims, traditional, base, scale, off, freqs, s);
      },
      "x"_a,
      "dims"_a,
      nb::kw_only(),
      "traditional"_a,
      "base"_a.none(),
      "scale"_a,
      "offset"_a,
      "freqs"_a = nb::none(),
      "stream"_a = nb::none(),
      "``mx.fast.rope`` as one fused primitive on a CPU stream (MLX's op "
      "elsewhere).");
  m.def(
      "scaled_dot_product_attention",
      [](const mx::array& q,
         const mx::array& k,
         const mx::array& v,
         float scale,
         const std::variant<std::monostate, std::string, mx::array>& mask,
         const std::optional<mx::array>& sinks,
         mx::StreamOrDevice s) {
        std::string mode;
        std::optional<mx::array> arr;
        if (std::holds_alternative<std::string>(mask)) {
          mode = std::get<std::string>(mask);
          if (mode != "causal") {
            throw nb::value_error(
                "mask must be None, 'causal' or an array (bool or additive)");
          }
        } else if (std::holds_alternative<mx::array>(mask)) {
          mode = "array";
          arr = std::get<mx::array>(mask);
        }
        return fused::sdpa(q, k, v, scale, mode, arr, sinks, s);
      },
      "q"_a,
      "k"_a,
      "v"_a,
      nb::kw_only(),
      "scale"_a,
      "mask"_a = nb::none(),
      "sinks"_a = nb::none(),
      "stream"_a = nb::none(),
      "``mx.fast.scaled_dot_product_attention``: one fused primitive on a CPU "
      "stream for up to 16 query rows (decode), MLX's op otherwise.");
}

} // namespace mlx_harmony_core
