// One layer's KV cache for a batch of independent sequences (continuous
// batching): rows join, leave and decode together, each at its own position.
#pragma once

#include "cache/kv_cache.h"

#include <memory>
#include <vector>

namespace mlx_harmony_core {

// Rows are right-aligned at a shared write column: row b holds its tokens in
// the logical columns [first_[b], idx_) and is at position pos_[b] (its RoPE
// offset). Every step writes one column for all rows in place; columns a row
// does not own are masked. A sliding-window layer keeps the last
// window - 1 + history columns (history -1: all), so an extracted row can
// still rewind. Quantized rows (bits 4/8) are stored packed and returned
// dequantized, as QuantizedKVCache does.
class BatchKVCache {
public:
  BatchKVCache(int window, int history, int bits, int group_size);

  // k, v: [B, kv_heads, N, head_dim] for the B rows; returns what the N
  // queries of every row attend (a window's worth for a sliding layer).
  std::pair<mx::array, mx::array> update_and_fetch(const mx::array& k,
                                                   const mx::array& v);
  // Boolean [B, 1, N, K] for N queries before the next update (none when
  // every row owns every column and N == 1).
  Mask make_mask(int n, std::optional<int> window, bool return_array) const;
  // (B,) int32: each row's position, for RoPE.
  mx::array offset() const;

  // Appends a row holding what `row` (a single-sequence cache of the matching
  // kind) holds.
  void insert(const Cache& row);
  // Keeps the rows `keep`, in that order (others leave the batch).
  void filter(const std::vector<int>& keep);
  // A single-sequence cache (KVCache, RotatingKVCache or QuantizedKVCache)
  // holding row b: what the prefix cache keeps when a request ends.
  std::unique_ptr<Cache> extract(int b) const;

  // Tokens trim() can remove from every row while the caches stay exact.
  int trimmable() const;
  int trim(int n);

  int size() const {
    return static_cast<int>(pos_.size());
  }
  const std::vector<int>& positions() const {
    return pos_;
  }
  // Columns the buffers span now (the attention width of a full layer).
  int width() const {
    return idx_ - front_;
  }
  std::vector<mx::array> state() const {
    return bufs_;
  }
  int64_t nbytes() const;
  int window() const {
    return window_;
  }
  int history() const {
    return history_;
  }
  int bits() const {
    return bits_;
  }
  int group_size() const {
    return group_size_;
  }

private:
  // First logical column the queries of the next n-token update attend.
  int fetch_start() const;
  // Room for n more columns: drops what no window or history needs, grows.
  void reserve(int n);
  std::vector<mx::array> items(const mx::array& k, const mx::array& v);
  std::string kind() const;

  int window_, history_, bits_, group_size_;
  int head_dim_ = 0; // of K/V before any padding to a quantization group
  mx::Dtype dtype_ = mx::float32;
  int idx_ = 0, front_ = 0; // write column; logical column of buffer col 0
  std::vector<int> pos_, first_;
  // [B, kv_heads, capacity, X]: keys, values (or the six quantized arrays).
  std::vector<mx::array> bufs_;
};

} // namespace mlx_harmony_core
