// GGUF files mapped into MLX arrays, and the block kernels over them.
#include "quant/gguf_blocks.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>
#include <stdexcept>

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_harmony_core {

namespace mx = mlx::core;

namespace {

mx::Dtype dtype_named(const std::string& name) {
  if (name == "uint8") {
    return mx::uint8;
  }
  if (name == "float32") {
    return mx::float32;
  }
  if (name == "float16") {
    return mx::float16;
  }
  if (name == "bfloat16") {
    return mx::bfloat16;
  }
  throw std::invalid_argument("mapped arrays are uint8, float32, float16 or "
                              "bfloat16, not '" +
                              name + "'");
}

} // namespace

void init_gguf(nb::module_& m) {
  using gguf::FileMapping;
  nb::class_<FileMapping>(m,
                          "GgufMapping",
                          "A read-only memory map of a file whose arrays "
                          "(array()) are views of it; unmapped when this "
                          "object and every such array are gone.")
      .def(
          "__init__",
          [](FileMapping* self, const std::string& path, bool populate) {
            new (self) FileMapping(path, populate);
          },
          "path"_a,
          "populate"_a = false,
          nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("size", &FileMapping::size, "The file's size in bytes.");
  // Arrays hold the mapping through a shared_ptr: the Python object owns one.
  m.def(
      "gguf_mapped_array",
      [](nb::handle mapping,
         int64_t offset,
         const std::vector<int>& shape,
         const std::string& dtype) {
        auto* raw = nb::inst_ptr<FileMapping>(mapping);
        // Keep the Python object (the owner) alive as long as the array.
        nb::object keep = nb::borrow(mapping);
        auto* holder = new nb::object(std::move(keep));
        std::shared_ptr<FileMapping> ptr(raw, [holder](FileMapping*) {
          nb::gil_scoped_acquire gil;
          delete holder;
        });
        return gguf::make_mapped_array(ptr,
                                       offset,
                                       mx::Shape(shape.begin(), shape.end()),
                                       dtype_named(dtype));
      },
      "mapping"_a,
      "offset"_a,
      "shape"_a,
      "dtype"_a,
      "An array of `shape`/`dtype` over the mapped file's bytes from `offset`: "
      "a view of the mapping (no copy) where gguf_mapped_zero_copy().");
  m.def("gguf_mapped_zero_copy",
        &gguf::mapped_arrays_zero_copy,
        "Whether gguf_mapped_array makes views (this MLX build's CPU "
        "allocator) rather than copies.");
  m.def("gguf_matmul",
        &gguf::block_matmul_op,
        "x"_a,
        "w"_a,
        "type"_a,
        nb::kw_only(),
        "stream"_a = nb::none(),
        "x @ w^T for w (N, row_bytes) uint8 in GGUF's own blocks (GGML type "
        "8 = Q8_0, 39 = MXFP4); CPU streams only.");
  m.def("gguf_gather_matmul",
        &gguf::block_gather_op,
        "x"_a,
        "w"_a,
        "indices"_a,
        "type"_a,
        nb::kw_only(),
        "stream"_a = nb::none(),
        "mx.gather_qmm(x, w, rhs_indices=indices, transpose=True) for "
        "experts w (E, N, row_bytes) in GGUF's own blocks; CPU only.");
  m.def("gguf_dequantize",
        &gguf::block_dequantize_op,
        "w"_a,
        "type"_a,
        nb::kw_only(),
        "stream"_a = nb::none(),
        "Rows of GGUF blocks (..., row_bytes) as float32 (..., cols).");
  m.def("gguf_block_type_supported",
        &gguf::block_type_supported,
        "type"_a,
        "Whether the GGUF block kernels take this GGML type.");
  m.def("gguf_block_isas",
        &gguf::block_isas,
        "The instruction sets the GGUF block kernels can use here, best "
        "first.");
  m.def(
      "gguf_block_isa",
      [] { return std::string(gguf::block_isa().name); },
      "The instruction set the GGUF block kernels use.");
  m.def(
      "set_gguf_block_isa",
      [](const std::string& name) {
        if (!gguf::set_block_isa(name.c_str())) {
          throw nb::value_error(("GGUF block kernels for '" + name +
                                 "' are not available on this CPU (see "
                                 "gguf_block_isas())")
                                    .c_str());
        }
      },
      "name"_a,
      "Use the named instruction set (tests compare them all).");
}

} // namespace mlx_harmony_core
