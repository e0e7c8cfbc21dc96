// CPU kernels for MLX's quantized matrices: a fused dequantize-and-dot GEMV
// for few rows and a dequantize-to-float tile for the BLAS on many rows.
//
// The same source (kernel_isa.inc) is compiled once per instruction set;
// active() picks the best one the CPU has at load time.
#pragma once

#include <cstdint>
#include <vector>

namespace mlx_harmony_core::quant {

// Whether this CPU runs the AVX2 kernels (AVX2 with FMA and F16C); false where
// they are not built.
inline bool cpu_has_avx2() {
#if defined(MHC_HAVE_X86_KERNELS)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// AffineN: any width from 2 to 8 bits (`bits`) as a bit stream; 4- and 8-bit
// weights take it only in groups of 16 (Affine4/Affine8 have their own
// kernels).
enum class Format : int { Affine4, Affine8, Mxfp4, AffineN };
enum class ScaleType : int { F32, F16, BF16, E8M0 };

// One matrix in MLX's layout: `rows` rows of `cols` values packed along the
// row (low bits first), one scale (and for affine one bias) per `group`.
struct QMatrix {
  const uint8_t* w = nullptr;
  const void* scales = nullptr;
  const void* biases = nullptr; // affine only
  // Affine without biases: each group's bias is -zero * its scale (GGUF's
  // Q4_0/Q5_0/Q8_0/Q3_K/Q6_K), so the kernels read no bias stream.
  int zero = 0;
  int64_t rows = 0, cols = 0;
  int group = 32;
  Format format = Format::Affine4;
  ScaleType scale_type = ScaleType::F32;
  int bits = 4;

  int64_t row_bytes() const {
    return format == Format::AffineN   ? cols * bits / 8
           : format == Format::Affine8 ? cols
                                       : cols / 2;
  }
  int64_t groups() const {
    return cols / group;
  }
};

// y[r][n] = <row n of a, x row r> for n in [n0, n1) and r < nx. x holds nx
// rows of a.cols floats (deinterleaved for 4-bit formats); xsum holds each
// row's per-group sums (affine formats' bias term).
using Gemv = void(const QMatrix& a,
                  const float* x,
                  const float* xsum,
                  int nx,
                  float* const* y,
                  int64_t n0,
                  int64_t n1);
// Rows [r0, r1) of a as floats in natural order, (r1 - r0) x a.cols.
using Dequant = void(const QMatrix& a, int64_t r0, int64_t r1, float* out);

// The kernels of one instruction set.
struct Isa {
  const char* name;
  // 4-bit formats read x deinterleaved in chunks of this many values: the
  // even elements of a chunk, then the odd ones (see deinterleave()).
  int chunk;
  Gemv* gemv;
  Dequant* dequant;
};

const Isa* isa_avx512(); // nullptr where not built
const Isa* isa_avx2();
const Isa& isa_generic();
// The instruction sets this CPU runs, the fastest first (active()'s default).
std::vector<const Isa*> isas();

// The instruction set in use: the best the CPU supports, unless set().
const Isa& active();
// Use the named one ("avx512", "avx2", "generic"); false if unavailable.
bool set_active(const char* name);

// Reorders a row of n values (n a multiple of chunk) into the 4-bit layout.
void deinterleave(const float* x, int64_t n, int chunk, float* out);

} // namespace mlx_harmony_core::quant
