// Quantized matmuls on the CPU as MLX primitives: quantized_matmul (every
// quantized Linear) and gather_qmm (mixture-of-experts layers) for affine
// 4/8-bit and MXFP4 weights. The ops take MLX's arguments, validate them with
// MLX's own ops and fall back to them for anything else (GPU streams, other
// modes and widths, batched weights in quantized_matmul).
#pragma once

#include "mlx/array.h"
#include "mlx/utils.h"
#include "primitive/cpu_primitive.h"

#include <optional>
#include <string>
#include <vector>

namespace mlx_harmony_core {

namespace mx = mlx::core;

// A row-major view of a's bytes: a's own data, or a copy into buf when a is
// strided (the kernels read rows of plain memory).
const uint8_t* row_major(const mx::array& a, std::vector<uint8_t>& buf);

// Whether our kernels take (mode, bits, group_size); else MLX's do.
bool quant_supported(const std::string& mode, int bits, int group_size);

mx::array quantized_matmul(const mx::array& x,
                           const mx::array& w,
                           const mx::array& scales,
                           const std::optional<mx::array>& biases,
                           bool transpose,
                           std::optional<int> group_size,
                           std::optional<int> bits,
                           const std::string& mode,
                           mx::StreamOrDevice s = {});

mx::array gather_qmm(const mx::array& x,
                     const mx::array& w,
                     const mx::array& scales,
                     const std::optional<mx::array>& biases,
                     const std::optional<mx::array>& lhs_indices,
                     const std::optional<mx::array>& rhs_indices,
                     bool transpose,
                     std::optional<int> group_size,
                     std::optional<int> bits,
                     const std::string& mode,
                     bool sorted_indices,
                     mx::StreamOrDevice s = {});

// Shared by both primitives: the quantization and how to rebuild MLX's op.
struct QuantSpec {
  int group_size;
  int bits;
  std::string mode;
  bool transpose;
  bool operator==(const QuantSpec&) const = default;
};

// What both primitives share: CPU evaluation through a kernel entry point (as
// every CPU op of ours, a CpuPrimitive), and the transforms (vjp, jvp, vmap) of
// MLX's own op on the same inputs.
class QuantPrimitive : public CpuPrimitive {
public:
  // The kernel entry: fills out from the (weak) inputs. A plain function, as
  // the task can run after the graph (and this primitive) is gone.
  using Kernel = void (*)(mx::array& out,
                          std::vector<mx::array>& inputs,
                          const QuantSpec& spec);

  QuantPrimitive(mx::Stream stream,
                 const char* name,
                 QuantSpec spec,
                 Kernel kernel);

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  std::pair<std::vector<mx::array>, std::vector<int>>
  vmap(const std::vector<mx::array>& inputs,
       const std::vector<int>& axes) override;
  bool is_equivalent(const mx::Primitive& other) const override;

protected:
  // MLX's own op on the same inputs: the transforms' reference.
  virtual mx::array reference(const std::vector<mx::array>& inputs) = 0;
  QuantSpec spec_;
  Kernel kernel_;
};

class QuantMatmul : public QuantPrimitive {
public:
  QuantMatmul(mx::Stream stream, QuantSpec spec);
  std::vector<mx::Shape>
  output_shapes(const std::vector<mx::array>& inputs) override;

private:
  mx::array reference(const std::vector<mx::array>& inputs) override;
};

class GatherQuantMatmul : public QuantPrimitive {
public:
  GatherQuantMatmul(mx::Stream stream, QuantSpec spec);
  std::vector<mx::Shape>
  output_shapes(const std::vector<mx::array>& inputs) override;

private:
  mx::array reference(const std::vector<mx::array>& inputs) override;
};

} // namespace mlx_harmony_core
