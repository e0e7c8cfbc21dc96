// Matrix products computed directly on GGUF's own block layouts (no repack),
// so a model's weights can be arrays over the memory-mapped file:
//   Q8_0  (type 8):  34-byte blocks, f16 d then 32 int8 q; value = d * q
//   MXFP4 (type 39): 17-byte blocks, e8m0 e then 16 bytes; value j is the low
//                    nibble of byte j, value j+16 its high nibble, each a
//                    code into llama.cpp's kvalues (doubled e2m1) times
//                    2^(e-128)
// A weight matrix is `rows` rows of `row_bytes` bytes (whole blocks of 32
// values). Few rows of x: a fused GEMV per ISA (generic C++, AVX2 picked at
// run time); many: dequantized tiles through the BLAS (cblas_sgemm), on the
// quantized kernels' thread pool.
#pragma once

#include "mlx/array.h"
#include "mlx/utils.h"
#include "primitive/cpu_primitive.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace mlx_harmony_core::gguf {

namespace mx = mlx::core;

constexpr int kQ8_0 = 8;
constexpr int kMxfp4 = 39;

// Whether the block kernels take this GGML type (Q8_0, MXFP4).
bool block_type_supported(int type);
// Bytes of one block of 32 values of `type` (throws for other types).
int block_bytes(int type);

// y[r][n] = <row n of w, x row r> for n in [n0, n1), r < nx; x rows are
// `cols` floats (every ISA's block GEMV has this type).
using BlockGemv = void(int type,
                       const uint8_t* w,
                       int64_t row_bytes,
                       const float* const* x,
                       int nx,
                       float* const* y,
                       int64_t n0,
                       int64_t n1);
// Rows [r0, r1) of w as floats, (r1 - r0) x cols, row-major.
using BlockDequant = void(int type,
                          const uint8_t* w,
                          int64_t row_bytes,
                          int64_t r0,
                          int64_t r1,
                          float* out);

// One instruction set's kernels over rows of a block matrix.
struct BlockIsa {
  const char* name;
  BlockGemv* gemv;
  BlockDequant* dequant;
};

const BlockIsa& block_isa_generic();
const BlockIsa* block_isa_avx2(); // nullptr where not built or not supported
const BlockIsa& block_isa();      // the one in use
bool set_block_isa(const char* name);  // false if unavailable
std::vector<std::string> block_isas(); // available, best first

// One product y = x @ w^T over a block matrix (w: rows outputs of cols).
struct BlockJob {
  const uint8_t* w;
  int64_t rows, row_bytes;
  std::vector<const float*> x; // nx rows of cols floats
  std::vector<float*> y;       // nx output rows of `rows` floats
};

// Runs every job: GEMV-sized ones together in one parallel pass, the rest
// (nx at or above the quantized kernels' gemm_rows()) as tiled BLAS GEMMs.
void block_matmul(int type, std::vector<BlockJob>& jobs);

// Ops (CPU streams only; ValueError-style std::invalid_argument otherwise).
// x (..., K) float; w (N, K/32*block_bytes) uint8 -> (..., N) in x's dtype.
mx::array block_matmul_op(const mx::array& x,
                          const mx::array& w,
                          int type,
                          mx::StreamOrDevice s = {});
// x (..., M, K); w (E, N, row_bytes) uint8; indices (...) picking experts,
// broadcast against x's batch dims (as mx.gather_qmm's rhs_indices) ->
// (broadcast batch..., M, N).
mx::array block_gather_op(const mx::array& x,
                          const mx::array& w,
                          const mx::array& indices,
                          int type,
                          mx::StreamOrDevice s = {});
// w (..., row_bytes) uint8 -> (..., cols) float32: the reference dequantizer.
mx::array
block_dequantize_op(const mx::array& w, int type, mx::StreamOrDevice s = {});

// The block kernels as a CpuPrimitive; transforms through the dequantized
// weights with MLX's matmuls (gradients and vmap for x, none for w).
class BlockMatmul : public CpuPrimitive {
public:
  // kind: 0 dense (x, w), 1 gather (x, w, lhs, rhs), 2 dequantize (w)
  BlockMatmul(mx::Stream stream, int type, int kind);
  std::vector<mx::Shape>
  output_shapes(const std::vector<mx::array>& inputs) override;

private:
  int type_;
  int kind_;
};

// A read-only memory map of a whole file, shared by the arrays made over it:
// it is unmapped when the mapping object and the last such array are gone.
class FileMapping {
public:
  // populate: read the file and fill the page tables now (MAP_POPULATE; macOS:
  // MADV_WILLNEED). Throws std::runtime_error.
  FileMapping(const std::string& path, bool populate);
  ~FileMapping();
  FileMapping(const FileMapping&) = delete;
  FileMapping& operator=(const FileMapping&) = delete;
  const uint8_t* data() const {
    return base_;
  }
  size_t size() const {
    return size_;
  }

private:
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
};

// Whether arrays over a mapping are zero-copy with this MLX build (its CPU
// allocator's buffer layout is recognized); otherwise make_mapped_array
// copies (correct, not free).
bool mapped_arrays_zero_copy();

// An array of `shape`/`dtype` over memory MLX does not own (data, with a
// size_t slot before it for the CPU allocator's header), holding `owner`
// alive and never freed or reused by MLX. Only where
// mapped_arrays_zero_copy().
mx::array foreign_array(uint8_t* data,
                        const mx::Shape& shape,
                        mx::Dtype dtype,
                        std::shared_ptr<const void> owner);

// An array of `shape`/`dtype` over bytes [offset, offset + nbytes) of the
// mapping, holding it alive. Throws std::invalid_argument when the range is
// outside the file.
mx::array make_mapped_array(const std::shared_ptr<FileMapping>& map,
                            int64_t offset,
                            const mx::Shape& shape,
                            mx::Dtype dtype);

} // namespace mlx_harmony_core::gguf
