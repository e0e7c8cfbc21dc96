// KV caches for mlx-lm models: full, sliding-window with rewindable history,
// and quantized. Keys/values are [B, kv_heads, T, head_dim].
#pragma once

#include "mlx/array.h"

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace mlx_harmony_core {

namespace mx = mlx::core;

// What make_mask returns, with mlx-lm's meaning: none, "causal", or a
// boolean [N, K] array (true = attend).
using Mask = std::variant<std::monostate, std::string, mx::array>;

class Cache {
public:
  virtual ~Cache() = default;

  // Appends k, v (L tokens) and returns the keys/values the L queries attend.
  virtual std::pair<mx::array, mx::array>
  update_and_fetch(const mx::array& k, const mx::array& v) = 0;
  // The mask for N queries before the next update (mlx-lm's contract).
  virtual Mask
  make_mask(int n, std::optional<int> window, bool return_array) const = 0;
  // How many tokens trim() can remove while keeping the cache exact.
  virtual int trimmable() const;
  // Removes min(n, trimmable()) tokens; returns how many it removed.
  virtual int trim(int n);
  virtual std::vector<mx::array> state() const = 0;
  virtual int64_t nbytes() const;
  virtual std::unique_ptr<Cache> copy() const = 0;
  virtual std::string kind() const = 0;
  // Integer settings that, with state(), rebuild the cache (save/load).
  virtual std::map<std::string, int64_t> meta() const;
  virtual void restore(const std::vector<mx::array>& arrays,
                       const std::map<std::string, int64_t>& meta) = 0;

  int offset() const {
    return offset_;
  }
  bool empty() const {
    return !keys_.has_value();
  }

protected:
  // Writes x at [start, start + L) of buf, growing it (doubling) as needed.
  static mx::array
  write(std::optional<mx::array>& buf, const mx::array& x, int start);
  // Makes buf hold rows [0, start + shape[2]) of `shape` in t (doubling its
  // capacity; rows before start kept).
  static void
  grow(std::optional<mx::array>& buf, mx::Shape shape, mx::Dtype t, int start);
  // Validates an update's shapes against the cache; records head_dim.
  void check(const mx::array& k, const mx::array& v);

  int offset_ = 0;
  int head_dim_ = -1; // of the keys, once known (packed buffers hide it)
  std::optional<mx::array> keys_, values_;
};

// Full attention: every token is kept.
class KVCache : public Cache {
public:
  std::pair<mx::array, mx::array> update_and_fetch(const mx::array& k,
                                                   const mx::array& v) override;
  Mask
  make_mask(int n, std::optional<int> window, bool return_array) const override;
  std::vector<mx::array> state() const override;
  std::unique_ptr<Cache> copy() const override {
    // The copy shares the buffers: neither may write the shared rows in
    // place while the other (maybe on another stream) still reads them.
    handed_ = std::max(handed_, offset_);
    return std::make_unique<KVCache>(*this);
  }
  std::string kind() const override {
    return "KVCache";
  }
  // For a fused step that writes its new rows itself (fused::stack_step):
  // the key and value buffers with room for k_rows / v_rows (B, kv_heads, n,
  // head_dim) at offset(), grown as update_and_fetch grows them; commit then
  // takes the step's buffers (those rows written) and advances the offset.
  std::pair<mx::array, mx::array>
  reserve(const mx::Shape& k_rows, const mx::Shape& v_rows, mx::Dtype t);
  void commit(mx::array keys, mx::array values, int n);
  // Rows of the buffers handed out as views (update_and_fetch, state,
  // restore): a step writing below this must not update them in place.
  int handed() const {
    return handed_;
  }

private:
  mutable int handed_ = 0;

public:
  void restore(const std::vector<mx::array>& arrays,
               const std::map<std::string, int64_t>& meta) override;
};

// Sliding window of `max_size` tokens (the first `keep` always attended),
// keeping `history` extra tokens (-1: all) so it can rewind after wrapping.
class RotatingKVCache : public Cache {
public:
  RotatingKVCache(int max_size, int keep, int history);

  std::pair<mx::array, mx::array> update_and_fetch(const mx::array& k,
                                                   const mx::array& v) override;
  Mask
  make_mask(int n, std::optional<int> window, bool return_array) const override;
  int trimmable() const override;
  std::vector<mx::array> state() const override;
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<RotatingKVCache>(*this);
  }
  std::string kind() const override {
    return "RotatingKVCache";
  }
  std::map<std::string, int64_t> meta() const override;
  void restore(const std::vector<mx::array>& arrays,
               const std::map<std::string, int64_t>& meta) override;

  int max_size() const {
    return max_size_;
  }
  int keep() const {
    return keep_;
  }
  int history() const {
    return history_;
  }
  int start() const {
    return start_;
  }

private:
  // First position the queries at `pos` and later can attend (besides keep).
  int window_start(int pos) const;

  int max_size_, keep_, history_;
  int start_ = 0; // position of buffer row `keep_`
};

// Quantized full-attention cache: stores mx.quantize'd K/V and returns them
// dequantized, so attention (with sinks) stays the model's own.
class QuantizedKVCache : public Cache {
public:
  // group_size 0: chosen from the head dimension at the first update (64 when
  // it divides it, else 32, padding a head narrower than a group).
  QuantizedKVCache(int bits, int group_size);

  std::pair<mx::array, mx::array> update_and_fetch(const mx::array& k,
                                                   const mx::array& v) override;
  Mask
  make_mask(int n, std::optional<int> window, bool return_array) const override;
  std::vector<mx::array> state() const override;
  int64_t nbytes() const override;
  std::unique_ptr<Cache> copy() const override {
    return std::make_unique<QuantizedKVCache>(*this);
  }
  std::string kind() const override {
    return "QuantizedKVCache";
  }
  std::map<std::string, int64_t> meta() const override;
  void restore(const std::vector<mx::array>& arrays,
               const std::map<std::string, int64_t>& meta) override;

  int bits() const {
    return bits_;
  }
  int group_size() const {
    return group_size_;
  }

private:
  int bits_, group_size_;
  int head_dim_ = 0; // the K/V width before padding to a whole group
  mx::Dtype dtype_ = mx::float32;
  // keys_/values_ hold the packed data; these the scales and biases.
  std::optional<mx::array> kscales_, kbiases_, vscales_, vbiases_;
};

// Tokens [a, b) of x along the sequence axis (axis 2), as a view.
mx::array seq_rows(const mx::array& x, int a, int b);

// The kv group size for a head dim: `requested`, checked, or with 0 64 when it
// divides the head dim, else 32 (a narrower head is padded to a group).
int kv_group_size(int head_dim, int requested);
// K or V [B, H, T, D] quantized in whole groups of D (padded with zeros).
std::vector<mx::array>
quantize_kv(const mx::array& x, int group_size, int bits);
// The inverse of quantize_kv, cut back to head_dim, in `dtype`.
mx::array dequantize_kv(const mx::array& w,
                        const mx::array& s,
                        const mx::array& b,
                        int group_size,
                        int bits,
                        int head_dim,
                        mx::Dtype dtype);

// mlx-lm's causal mask: [N, offset + N], optionally windowed.
mx::array causal_mask(int n, int offset, std::optional<int> window);

} // namespace mlx_harmony_core
