// GGUF tensors read from the file straight into new MLX arrays in MLX's
// layout, in one pass: each thread preads a few hundred KB of blocks into its
// own small buffer and repacks them into the final arrays (no intermediate
// copy of a tensor, no numpy). The Python loader's numpy path
// (models/gguf.py: tensor_arrays) is the reference these must equal bit for
// bit.
#pragma once

#include "mlx/array.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace mlx_harmony_core::quant {

namespace mx = mlx::core;

// One anonymous mapping that a model's loaded weights are carved from, advised
// as transparent huge pages: a small model's tensors are each under a 2 MiB
// page, so only one block holding all of them can be backed by huge pages
// (decode streams every weight; on 4 KiB pages each page costs a TLB miss).
// Arrays made in it (new_array) keep it mapped until the last is gone.
class WeightArena {
public:
  // Throws std::runtime_error when the mapping cannot be made.
  WeightArena(size_t capacity, bool huge_pages);
  ~WeightArena();
  WeightArena(const WeightArena&) = delete;
  WeightArena& operator=(const WeightArena&) = delete;
  // nbytes of zeroed memory, 64-byte aligned with a free size_t slot before
  // it (MLX's CPU buffer header); nullptr once the arena is full.
  uint8_t* take(size_t nbytes);
  size_t capacity() const {
    return size_;
  }
  size_t used();

private:
  uint8_t* base_ = nullptr;
  size_t size_ = 0, used_ = 0;
  std::mutex mu_;
};

// A new zero-filled array of shape/dtype: in `arena` where
// there is one with room and this MLX build's CPU buffers allow views,
// otherwise from MLX's allocator (advised as huge pages if `huge_pages`).
mx::array new_weight_array(const mx::Shape& shape,
                           mx::Dtype dtype,
                           bool huge_pages,
                           const std::shared_ptr<WeightArena>& arena);

// Whether load_gguf_tensor converts this GGML type: F32, F16, BF16, Q4_0,
// Q4_1, Q8_0 and MXFP4.
bool gguf_type_supported(int type);

// One GGUF tensor (GGML type `type`, row-major `shape`, its data at byte
// `offset` of the open file `fd`) as evaluated MLX arrays: {weight} for float
// types (BF16 as bfloat16); {codes (uint32), scales, biases} for affine types
// (Q4_0, Q4_1, Q8_0: 4/8-bit, groups of 32) and {codes, scales (uint8 E8M0)}
// for MXFP4. `threads` (>= 1) threads read and convert it. `huge_pages`:
// the arrays' memory is advised as transparent huge pages; `arena` (may be
// null): the arrays are made in it while it has room. Throws
// std::invalid_argument for a type or shape it cannot convert and
// std::runtime_error when the file cannot be read (ends early, I/O error).
std::vector<mx::array>
load_gguf_tensor(int fd,
                 int64_t offset,
                 int type,
                 const std::vector<int64_t>& shape,
                 int threads,
                 bool huge_pages,
                 const std::shared_ptr<WeightArena>& arena);

} // namespace mlx_harmony_core::quant
