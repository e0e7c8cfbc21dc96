// The one MLX primitive class our CPU ops share: outputs a plain function of
// the (weak) inputs computes on the CPU, transforms (vjp, jvp, vmap) through
// MLX's own ops on the same inputs (the op's fallback).
#pragma once

#include "mlx/array.h"
#include "mlx/primitives.h"

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace mlx_harmony_core {

namespace mx = mlx::core;

// Weak copies of arrays for a task that may run after the graph is gone.
std::vector<mx::array> weak(const std::vector<mx::array>& inputs);

class CpuPrimitive : public mx::Primitive {
public:
  using Fallback =
      std::function<std::vector<mx::array>(std::vector<mx::array>)>;
  // Fills the outputs (allocated, contiguous) from the inputs; it may run
  // after this primitive is gone, so it owns what it captures.
  using Run =
      std::function<void(std::vector<mx::array>&, std::vector<mx::array>&)>;

  // key: the parameters; equal names and keys compute the same function (an
  // empty key: never equivalent). No fallback: the op has no transforms.
  CpuPrimitive(mx::Stream stream,
               const char* name,
               std::string key,
               Fallback fallback,
               Run run)
      : mx::Primitive(stream), name_(name), key_(std::move(key)),
        fallback_(std::move(fallback)), run_(std::move(run)) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
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
  // Output `out` may take input `in`'s buffer (when no other array holds
  // it, row-contiguous, same size; and, unless `shared_data`, no view of its
  // data exists), as MLX's SliceUpdate does; run() then finds the output's
  // data at the input's (else it must copy what it keeps of the input).
  // `shared_data`: the caller knows the views of the data (MLX's encoder
  // keeps the previous step's outputs alive until their compute ran; a KV
  // cache's views of rows below where the step writes) never see the writes.
  void donate(int out, int in, bool shared_data = false) {
    donate_.push_back({out, in, shared_data});
  }
  const char* name() const override {
    return name_;
  }

private:
  void check_fallback(const char* transform) const;

  const char* name_;
  std::string key_;
  Fallback fallback_;
  Run run_;
  struct Donation {
    int out, in;
    bool shared_data;
  };
  std::vector<Donation> donate_;
};

} // namespace mlx_harmony_core
