// GGUF tensors read from the file straight into new MLX arrays in MLX's
// layout, in one pass: each thread preads a few hundred KB of blocks into its
// own small buffer and repacks them into the final arrays (no intermediate
// copy of a tensor, no numpy). The Python loader's numpy path
// (models/gguf.py: tensor_arrays) is the reference these must equal bit for
// bit.
#pragma once

#include "mlx/array.h"

#include <cstdint>
#include <vector>

namespace mlx_harmony_core::quant {

namespace mx = mlx::core;

// Whether load_gguf_tensor converts this GGML type: F32, F16, BF16, Q4_0,
// Q4_1, Q8_0 and MXFP4.
bool gguf_type_supported(int type);

// One GGUF tensor (GGML type `type`, row-major `shape`, its data at byte
// `offset` of the open file `fd`) as evaluated MLX arrays: {weight} for float
// types (BF16 as bfloat16); {codes (uint32), scales, biases} for affine types
// (Q4_0, Q4_1, Q8_0: 4/8-bit, groups of 32) and {codes, scales (uint8 E8M0)}
// for MXFP4. `threads` (>= 1) threads read and convert it. `huge_pages`:
// the arrays' memory is advised as transparent huge pages. Throws
// std::invalid_argument for a type or shape it cannot convert and
// std::runtime_error when the file cannot be read (ends early, I/O error).
std::vector<mx::array> load_gguf_tensor(int fd,
                                        int64_t offset,
                                        int type,
                                        const std::vector<int64_t>& shape,
                                        int threads,
                                        bool huge_pages);

} // namespace mlx_harmony_core::quant
