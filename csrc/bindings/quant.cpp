#include "quant/quant.h"

#include "quant/kernel.h"
#include "quant/matmul.h"
#include "quant/pool.h"
#include "quant/repack.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_harmony_core {

void init_quant(nb::module_& m) {
  m.def("quantized_matmul",
        &quantized_matmul,
        "x"_a,
        "w"_a,
        "scales"_a,
        "biases"_a = nb::none(),
        "transpose"_a = true,
        "group_size"_a = nb::none(),
        "bits"_a = nb::none(),
        "mode"_a = "affine",
        nb::kw_only(),
        "stream"_a = nb::none(),
        "``mx.quantized_matmul`` with our CPU kernels for affine 4/8-bit "
        "(groups of 32/64/128) and MXFP4 weights; anything else (a GPU "
        "stream, other modes or widths, batched weights) is MLX's own op.");
  m.def("gather_qmm",
        &gather_qmm,
        "x"_a,
        "w"_a,
        "scales"_a,
        "biases"_a = nb::none(),
        "lhs_indices"_a = nb::none(),
        "rhs_indices"_a = nb::none(),
        "transpose"_a = true,
        "group_size"_a = nb::none(),
        "bits"_a = nb::none(),
        "mode"_a = "affine",
        "sorted_indices"_a = false,
        nb::kw_only(),
        "stream"_a = nb::none(),
        "``mx.gather_qmm`` with our CPU kernels (same formats as "
        "quantized_matmul); each expert's weights are read once per call.");
  m.def("quant_supported",
        &quant_supported,
        "mode"_a,
        "bits"_a,
        "group_size"_a,
        "Whether our kernels take this quantization (else MLX's do).");
  m.def(
      "quant_isa",
      [] { return std::string(quant::active().name); },
      "The instruction set the quantized kernels use.");
  m.def(
      "quant_isas",
      [] {
        std::vector<std::string> v;
        for (const quant::Isa* i : quant::isas()) {
          v.emplace_back(i->name);
        }
        return v;
      },
      "The instruction sets this CPU can run, best first.");
  m.def(
      "set_quant_isa",
      [](const std::string& name) {
        if (!quant::set_active(name.c_str())) {
          throw nb::value_error(
              ("quantized kernels for '" + name +
               "' are not available on this CPU (see quant_isas())")
                  .c_str());
        }
      },
      "name"_a,
      "Use the named instruction set's kernels (tests compare them all).");
  m.def(
      "quant_threads",
      [] { return quant::Pool::instance().threads(); },
      "Threads the quantized kernels use (the caller included).");
  m.def(
      "set_quant_threads",
      [](int n) {
        if (n < 1) {
          throw nb::value_error("quantized kernel threads must be >= 1");
        }
        quant::Pool::instance().set_threads(n);
      },
      "n"_a,
      "Set the quantized kernels' thread count.");
  m.def("quant_gemm_rows",
        &quant::gemm_rows,
        "Rows of x from which a quantized matmul dequantizes tiles for the "
        "BLAS instead of running the fused GEMV.");
  m.def(
      "set_quant_gemm_rows",
      [](int rows) {
        if (rows < 1) {
          throw nb::value_error("gemm rows must be >= 1");
        }
        quant::set_gemm_rows(rows);
      },
      "rows"_a);
  m.def("quant_parallel_bytes",
        &quant::parallel_bytes,
        "Work (weight bytes times rows of x) from which a quantized GEMV is "
        "split over threads.");
  m.def(
      "set_quant_parallel_bytes",
      [](int64_t bytes) { quant::set_parallel_bytes(bytes); },
      "bytes"_a);
  // The Python object holds the arena through a shared_ptr, as every array
  // made in it does: no Python reference (nor GIL) is needed to free it.
  struct Arena {
    std::shared_ptr<quant::WeightArena> p;
  };
  nb::class_<Arena>(m,
                    "WeightArena",
                    "One block of memory (transparent huge pages) that a "
                    "model's loaded weights are made in: unmapped when this "
                    "object and every array in it are gone.")
      .def(
          "__init__",
          [](Arena* self, size_t capacity, bool huge_pages) {
            new (self) Arena{
                std::make_shared<quant::WeightArena>(capacity, huge_pages)};
          },
          "capacity"_a,
          "huge_pages"_a = true)
      .def_prop_ro(
          "capacity",
          [](const Arena& a) { return a.p->capacity(); },
          "Bytes it holds.")
      .def_prop_ro(
          "used", [](Arena& a) { return a.p->used(); }, "Bytes handed out.")
      .def(
          "zeros",
          [](Arena& a, const std::vector<int>& shape, mx::Dtype dtype) {
            return quant::new_weight_array(
                mx::Shape(shape.begin(), shape.end()), dtype, false, a.p);
          },
          "shape"_a,
          "dtype"_a,
          "A new zero-filled array in the arena (from MLX's allocator once "
          "the arena is full).");
  m.def(
      "load_gguf_tensor",
      [](int fd,
         int64_t offset,
         int type,
         const std::vector<int64_t>& shape,
         int threads,
         bool huge_pages,
         Arena* arena) {
        nb::gil_scoped_release release;
        return quant::load_gguf_tensor(
            fd,
            offset,
            type,
            shape,
            threads,
            huge_pages,
            arena ? arena->p : std::shared_ptr<quant::WeightArena>());
      },
      "fd"_a,
      "offset"_a,
      "type"_a,
      "shape"_a,
      "threads"_a,
      "huge_pages"_a = true,
      "arena"_a.none() = nb::none(),
      "One GGUF tensor read from an open file into new MLX arrays in "
      "MLX's layout: [weight] for F32/F16/BF16, [codes, scales, biases] "
      "for Q4_0/Q4_1/Q8_0, [codes, scales] for MXFP4; made in `arena` (a "
      "WeightArena) while it has room.");
  m.def("gguf_type_supported",
        &quant::gguf_type_supported,
        "type"_a,
        "Whether load_gguf_tensor converts this GGML type.");
}

} // namespace mlx_harmony_core
