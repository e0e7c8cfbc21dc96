// The KV caches: single-sequence (Cache and its kinds) and batched.
#include "cache/batch_cache.h"
#include "cache/kv_cache.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_harmony_core {

namespace {

// "all" -> -1, "window" -> 0, N -> N extra tokens kept for rewinding.
int parse_history(const std::variant<int, std::string>& h) {
  if (auto* s = std::get_if<std::string>(&h)) {
    if (*s == "all") {
      return -1;
    }
    if (*s == "window") {
      return 0;
    }
    throw std::invalid_argument(
        "history must be 'window', 'all' or a number of tokens");
  }
  const int n = std::get<int>(h);
  if (n < 0) {
    throw std::invalid_argument("history must be >= 0 tokens");
  }
  return n;
}

void bind_kv_caches(nb::module_& m) {
  nb::class_<Cache>(
      m, "Cache", "Base of the C++ KV caches (mlx-lm's contract).")
      .def("update_and_fetch",
           &Cache::update_and_fetch,
           "keys"_a,
           "values"_a,
           "Append [B, kv_heads, L, head_dim] keys/values; return what the L "
           "queries attend.")
      .def(
          "make_mask",
          [](const Cache& c,
             int n,
             bool return_array,
             std::optional<int> window_size) {
            return c.make_mask(n, window_size, return_array);
          },
          "N"_a,
          "return_array"_a = false,
          "window_size"_a = nb::none(),
          "Mask for N queries before the next update: None, 'causal' or a "
          "boolean [N, K] array.")
      .def_prop_ro("offset", &Cache::offset, "Tokens seen (the RoPE offset).")
      .def_prop_ro("state", &Cache::state, "Arrays to evaluate or save.")
      .def("is_trimmable", [](const Cache&) { return true; })
      .def("trimmable",
           &Cache::trimmable,
           "How many tokens trim() can remove while staying exact.")
      .def("trim",
           &Cache::trim,
           "n"_a,
           "Remove min(n, trimmable()) tokens; returns how many were removed "
           "(less than n means the cache cannot rewind that far).")
      .def_prop_ro("nbytes", &Cache::nbytes, "Bytes held (capacity).")
      .def("empty", &Cache::empty)
      .def("copy", &Cache::copy, "A cheap copy (copy-on-write buffers).")
      .def("__copy__", &Cache::copy)
      .def("__deepcopy__", [](const Cache& c, nb::handle) { return c.copy(); })
      .def("__bool__", [](const Cache&) { return true; })
      .def_prop_ro("kind", &Cache::kind)
      .def("meta", &Cache::meta, "Integer settings for save/load.")
      .def("restore", &Cache::restore, "arrays"_a, "meta"_a);

  nb::class_<KVCache, Cache>(m, "KVCache", "Full-attention KV cache.")
      .def(nb::init<>());

  nb::class_<RotatingKVCache, Cache>(
      m,
      "RotatingKVCache",
      "Sliding-window KV cache (attention over the last max_size tokens, the "
      "first `keep` always included) that can rewind after it wraps: it keeps "
      "`history` extra tokens ('window': none, 'all', or a number).")
      .def(
          "__init__",
          [](RotatingKVCache* self,
             int max_size,
             int keep,
             std::variant<int, std::string> history) {
            new (self) RotatingKVCache(max_size, keep, parse_history(history));
          },
          "max_size"_a,
          "keep"_a = 0,
          "history"_a = 4096)
      .def_prop_ro("max_size", &RotatingKVCache::max_size)
      .def_prop_ro("keep", &RotatingKVCache::keep)
      .def_prop_ro("history", &RotatingKVCache::history)
      .def_prop_ro("start", &RotatingKVCache::start);

  nb::class_<QuantizedKVCache, Cache>(
      m,
      "QuantizedKVCache",
      "Full-attention KV cache stored quantized (4 or 8 bits) and returned "
      "dequantized, so attention sinks stay exact.")
      .def(nb::init<int, int>(), "bits"_a = 8, "group_size"_a = 64)
      .def_prop_ro("kv_bits", &QuantizedKVCache::bits)
      .def_prop_ro("group_size", &QuantizedKVCache::group_size);

  m.def("causal_mask",
        &causal_mask,
        "N"_a,
        "offset"_a,
        "window_size"_a = nb::none(),
        "mlx-lm's causal mask: boolean [N, offset + N].");
}

void bind_batch_cache(nb::module_& m) {
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
      .def(
          "trimmable",
          [](const BatchKVCache& c, std::optional<int> row) {
            if (!row) {
              return c.trimmable();
            }
            if (*row < 0 || *row >= c.size()) {
              throw std::invalid_argument("no row " + std::to_string(*row) +
                                          " in a batch of " +
                                          std::to_string(c.size()));
            }
            return c.trimmable(*row);
          },
          "row"_a = nb::none(),
          "Tokens trim() can remove from every row (or rewind() from `row`) "
          "while the caches stay exact.")
      .def("trim",
           &BatchKVCache::trim,
           "n"_a,
           "Remove min(n, trimmable()) tokens from every row; returns how "
           "many.")
      .def("rewind",
           &BatchKVCache::rewind,
           "n"_a,
           "Remove the last n[b] tokens of each row b (at most trimmable(b): "
           "rejected drafts); returns what each row lost.")
      .def("held", &BatchKVCache::held, "row"_a, "Tokens row `row` holds.")
      .def("size", &BatchKVCache::size, "Rows in the batch.")
      .def("__len__", &BatchKVCache::size)
      // mlx-lm tests `if cache:`; an empty batch is still a cache.
      .def("__bool__", [](const BatchKVCache&) { return true; });
}

} // namespace

void init_cache(nb::module_& m) {
  bind_kv_caches(m);
  bind_batch_cache(m);
}

} // namespace mlx_harmony_core
