#include "cache/batch_cache.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_harmony_core {

void init_batch_cache(nb::module_& m) {
  nb::class_<BatchKVCache>(
      m,
      "BatchKVCache",
      "One layer's KV cache for a batch of independent sequences, each at its "
      "own position: rows join (insert), leave (filter) and are taken out as "
      "single-sequence caches (extract). window 0 = full attention, else a "
      "sliding window keeping `history` extra tokens (-1: all); bits 4/8 store "
      "it quantized.")
      .def(nb::init<int, int, int, int>(),
           "window"_a = 0,
           "history"_a = -1,
           "bits"_a = 0,
           "group_size"_a = 0)
      .def("update_and_fetch",
           &BatchKVCache::update_and_fetch,
           "keys"_a,
           "values"_a,
           "Append [B, kv_heads, L, head_dim] keys/values (one row per "
           "sequence); return what the L queries of every row attend.")
      .def(
          "make_mask",
          [](const BatchKVCache& c,
             int n,
             bool return_array,
             std::optional<int> window_size) {
            return c.make_mask(n, window_size, return_array);
          },
          "N"_a,
          "return_array"_a = false,
          "window_size"_a = nb::none(),
          "Boolean [B, 1, N, K] mask for N queries before the next update "
          "(None when every row sees every column).")
      .def_prop_ro("offset",
                   &BatchKVCache::offset,
                   "(B,) int32 positions of the rows (the RoPE offsets).")
      .def_prop_ro("positions", &BatchKVCache::positions)
      .def_prop_ro("width", &BatchKVCache::width)
      .def_prop_ro("state", &BatchKVCache::state, "Arrays to evaluate.")
      .def_prop_ro("nbytes", &BatchKVCache::nbytes, "Bytes held (capacity).")
      .def_prop_ro("window", &BatchKVCache::window)
      .def_prop_ro("history", &BatchKVCache::history)
      .def_prop_ro("kv_bits", &BatchKVCache::bits)
      .def_prop_ro("group_size", &BatchKVCache::group_size)
      .def("insert",
           &BatchKVCache::insert,
           "row"_a,
           "Append a row holding what a single-sequence cache holds.")
      .def("filter",
           &BatchKVCache::filter,
           "keep"_a,
           "Keep the rows `keep`, in that order.")
      .def("extract",
           &BatchKVCache::extract,
           "row"_a,
           "Row `row` as a single-sequence cache (a copy).")
      .def("is_trimmable", [](const BatchKVCache&) { return true; })
      .def("trimmable", &BatchKVCache::trimmable)
      .def("trim", &BatchKVCache::trim, "n"_a)
      .def("size", &BatchKVCache::size, "Rows in the batch.")
      .def("__len__", &BatchKVCache::size)
      // mlx-lm tests `if cache:`; an empty batch is still a cache.
      .def("__bool__", [](const BatchKVCache&) { return true; });
}

} // namespace mlx_harmony_core
