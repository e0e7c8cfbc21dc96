// One layer's KV cache for a batch of independent sequences (continuous
// batching): rows join, leave and decode together, each at its own position.
#pragma once

#include "cache/kv_cache.h"

#include <memory>
#include <tuple>
#include <vector>

namespace mlx_harmony_core {

// Rows are right-aligned at a shared write column idx_ and row b is at
// position pos_[b] (its RoPE offset). Every step writes the same columns for
// all rows in place. Each row keeps a column -> position map (-1: a column the
// row does not own, or a hole left by a rewind), so rows rewind by their own
// amounts (rejected drafts) and the mask (causal, sliding window) is computed
// from positions, never from columns: holes are exact. Holes are squeezed out
// when the buffers grow or when they waste a quarter of the width. A
// sliding-window layer keeps the last window - 1 + history tokens of every row
// (history -1: all), so an extracted row can still rewind. Quantized rows
// (bits 4/8) are stored packed and returned dequantized, as QuantizedKVCache
// does.
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
  // For a fused step that writes its n new columns itself (fused::stack_step;
  // full-precision rows only): the key and value buffers with room for k_rows
  // / v_rows (B, kv_heads, n, head_dim), as update_and_fetch makes it, the
  // buffer column they go to and the first column the queries attend (what
  // make_mask covers); step_commit then takes the step's buffers (those
  // columns written) and advances every row by n.
  std::tuple<mx::array, mx::array, int, int>
  step_reserve(const mx::Shape& k_rows, const mx::Shape& v_rows, mx::Dtype t);
  void step_commit(mx::array keys, mx::array values, int n);
  // Buffer columns handed out as views (update_and_fetch, extract): a step
  // writing below this must not update the buffers in place.
  int handed() const {
    return handed_;
  }
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
  // Tokens rewind() can remove from row b while its cache stays exact.
  int trimmable(int b) const;
  // Removes the last n[b] tokens of each row b (at most trimmable(b)); returns
  // what each row lost.
  std::vector<int> rewind(const std::vector<int>& n);
  // Tokens row b holds (its real columns).
  int held(int b) const;

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
  // The buffers themselves (not views: while held, no step updates them in
  // place).
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
  // First logical column the queries of the next update attend.
  int fetch_start() const;
  // Row b's first column holding a position >= p (idx_ when none).
  int first_at(int b, int p) const;
  // Room for n more columns: drops what no window or history needs, grows
  // (the columns keep their places: a mask may have been made for them).
  void reserve(int n);
  // The first column a sliding layer's window and history still need.
  int keep_from() const;
  // Squeezes out holes once they waste a quarter of the attended width
  // (between steps: after a rewind).
  void squeeze();
  // Rebuilds the buffers with capacity `cap`, each row's tokens from logical
  // column `from` on right-aligned, without holes.
  void compact(int from, int cap);
  std::vector<mx::array> items(const mx::array& k, const mx::array& v);
  std::string kind() const;

  int window_, history_, bits_, group_size_;
  int head_dim_ = 0; // of K/V before any padding to a quantization group
  mx::Dtype dtype_ = mx::float32;
  int idx_ = 0, front_ = 0; // write column; logical column of buffer col 0
  mutable int handed_ = 0;  // see handed()
  std::vector<int> pos_;
  // cols_[b][c - front_]: the position row b holds at column c, or -1.
  std::vector<std::vector<int>> cols_;
  // [B, kv_heads, capacity, X]: keys, values (or the six quantized arrays).
  std::vector<mx::array> bufs_;
};

} // namespace mlx_harmony_core
