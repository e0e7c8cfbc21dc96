// The _core extension: one init function per area.
#include <nanobind/nanobind.h>
#include <stdexcept>

namespace nb = nanobind;

namespace mlx_harmony_core {
void init_sampling(nb::module_& m);
void init_stop(nb::module_& m);
void init_cache(nb::module_& m);
void init_quant(nb::module_& m);
void init_fused(nb::module_& m);
void init_gguf(nb::module_& m);
} // namespace mlx_harmony_core

NB_MODULE(_core, m) {
  // mx.array must be registered before our signatures mention it.
  nb::module_::import_("mlx.core");
  m.doc() = "C++ core of mlx-harmony-core: sampler, KV caches, stop matching, "
            "quantized matmuls, fused decode primitives.";
  // Module-wide: an index out of range in any area is the caller's ValueError.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const std::out_of_range& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  mlx_harmony_core::init_sampling(m);
  mlx_harmony_core::init_stop(m);
  mlx_harmony_core::init_cache(m);
  mlx_harmony_core::init_quant(m);
  mlx_harmony_core::init_fused(m);
  mlx_harmony_core::init_gguf(m);
}
