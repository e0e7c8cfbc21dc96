#include "cache/kv_cache.h"

#include "mlx/ops.h"

#include <algorithm>
#include <stdexcept>

namespace mlx_harmony_core {

namespace {

constexpr int kStep = 256;

int round_up(int n) {
  return (n + kStep - 1) / kStep * kStep;
}

int64_t bytes_of(const std::optional<mx::array>& a) {
  return a ? static_cast<int64_t>(a->nbytes()) : 0;
}

int64_t get(const std::map<std::string, int64_t>& m, const std::string& k) {
  auto it = m.find(k);
  if (it == m.end()) {
    throw std::invalid_argument("cache metadata lacks '" + k + "'");
  }
  return it->second;
}

Mask full_mask(int n, int offset, std::optional<int> window, bool as_array) {
  if (window) {
    return causal_mask(n, offset, window);
  }
  if (n == 1) {
    return std::monostate{};
  }
  if (as_array) {
    return causal_mask(n, offset, std::nullopt);
  }
  return std::string("causal");
}

} // namespace

mx::array seq_rows(const mx::array& x, int a, int b) {
  auto start = mx::Shape(x.ndim(), 0);
  auto stop = x.shape();
  start[2] = a;
  stop[2] = b;
  return mx::slice(x, start, stop);
}

mx::array causal_mask(int n, int offset, std::optional<int> window) {
  auto r = mx::arange(offset + n, mx::int32);
  auto l = mx::reshape(mx::arange(offset, offset + n, mx::int32), {n, 1});
  auto mask = mx::greater_equal(l, mx::reshape(r, {1, offset + n}));
  if (window) {
    mask = mx::logical_and(
        mask, mx::less(l, mx::add(r, mx::array(*window, mx::int32))));
  }
  return mask;
}

// -- Cache ---------------------------------------------------------------

int Cache::trimmable() const {
  return offset_;
}

int Cache::trim(int n) {
  if (n < 0) {
    throw std::invalid_argument("trim needs n >= 0");
  }
  const int m = std::min(n, trimmable());
  offset_ -= m;
  return m;
}

int64_t Cache::nbytes() const {
  return bytes_of(keys_) + bytes_of(values_);
}

std::map<std::string, int64_t> Cache::meta() const {
  return {{"offset", offset_}};
}

void Cache::check(const mx::array& k, const mx::array& v) {
  if (k.ndim() != 4 || v.ndim() != 4) {
    throw std::invalid_argument(
        "keys and values must be [batch, kv_heads, tokens, head_dim]");
  }
  if (k.shape(0) != v.shape(0) || k.shape(1) != v.shape(1) ||
      k.shape(2) != v.shape(2)) {
    throw std::invalid_argument(
        "keys and values disagree on batch, heads or tokens");
  }
  if (keys_ &&
      (keys_->shape(0) != k.shape(0) || keys_->shape(1) != k.shape(1) ||
       (head_dim_ >= 0 && head_dim_ != k.shape(3)))) {
    throw std::invalid_argument(
        "keys do not match the cache's batch, heads or head_dim; use a fresh "
        "cache for a different model or batch size");
  }
  head_dim_ = k.shape(3);
}

void Cache::grow(std::optional<mx::array>& buf,
                 mx::Shape shape,
                 mx::Dtype t,
                 int start) {
  const int need = start + shape[2];
  if (!buf || buf->shape(2) < need || buf->dtype() != t) {
    // Double the capacity: appends cost amortized O(1), not a copy per step.
    const int cap = buf ? buf->shape(2) : 0;
    shape[2] = round_up(std::max(need, 2 * cap));
    auto fresh = mx::zeros(shape, t);
    if (buf && start > 0) {
      fresh = mx::slice_update(fresh,
                               mx::astype(seq_rows(*buf, 0, start), t),
                               mx::Shape{0, 0, 0, 0},
                               mx::Shape{shape[0], shape[1], start, shape[3]});
    }
    buf = fresh;
  }
}

mx::array
Cache::write(std::optional<mx::array>& buf, const mx::array& x, int start) {
  grow(buf, x.shape(), x.dtype(), start);
  auto stop = buf->shape();
  stop[2] = start + x.shape(2);
  buf = mx::slice_update(*buf, x, mx::Shape{0, 0, start, 0}, stop);
  return *buf;
}

// -- KVCache -------------------------------------------------------------

std::pair<mx::array, mx::array> KVCache::update_and_fetch(const mx::array& k,
                                                          const mx::array& v) {
  check(k, v);
  write(keys_, k, offset_);
  write(values_, v, offset_);
  offset_ += k.shape(2);
  handed_ = std::max(handed_, offset_);
  return {seq_rows(*keys_, 0, offset_), seq_rows(*values_, 0, offset_)};
}

std::pair<mx::array, mx::array> KVCache::reserve(const mx::Shape& k_rows,
                                                 const mx::Shape& v_rows,
                                                 mx::Dtype t) {
  if (k_rows.size() != 4 || v_rows.size() != 4 || k_rows[0] != v_rows[0] ||
      k_rows[1] != v_rows[1] || k_rows[2] != v_rows[2]) {
    throw std::invalid_argument(
        "keys and values must be [batch, kv_heads, tokens, head_dim] and "
        "agree on batch, heads and tokens");
  }
  if (keys_ && (keys_->shape(0) != k_rows[0] || keys_->shape(1) != k_rows[1] ||
                (head_dim_ >= 0 && head_dim_ != k_rows[3]))) {
    throw std::invalid_argument(
        "keys do not match the cache's batch, heads or head_dim; use a fresh "
        "cache for a different model or batch size");
  }
  const auto before = keys_ ? keys_->id() : 0;
  grow(keys_, k_rows, t, offset_);
  grow(values_, v_rows, t, offset_);
  if (keys_->id() != before) {
    handed_ = 0; // fresh buffers: no view of them exists
  }
  return {*keys_, *values_};
}

void KVCache::commit(mx::array keys, mx::array values, int n) {
  head_dim_ = keys.shape(3);
  keys_ = std::move(keys);
  values_ = std::move(values);
  offset_ += n;
}

Mask KVCache::make_mask(int n,
                        std::optional<int> window,
                        bool return_array) const {
  return full_mask(n, offset_, window, return_array);
}

std::vector<mx::array> KVCache::state() const {
  if (!keys_) {
    return {};
  }
  handed_ = std::max(handed_, offset_);
  return {seq_rows(*keys_, 0, offset_), seq_rows(*values_, 0, offset_)};
}

void KVCache::restore(const std::vector<mx::array>& arrays,
                      const std::map<std::string, int64_t>& meta) {
  offset_ = static_cast<int>(get(meta, "offset"));
  if (arrays.size() == 2) {
    keys_ = arrays[0];
    values_ = arrays[1];
  } else if (!arrays.empty() || offset_ != 0) {
    throw std::invalid_argument("KVCache state needs keys and values");
  }
  handed_ = keys_ ? keys_->shape(2) : 0;
}

// -- RotatingKVCache -----------------------------------------------------

RotatingKVCache::RotatingKVCache(int max_size, int keep, int history)
    : max_size_(max_size), keep_(keep), history_(history), start_(keep) {
  if (max_size < 1) {
    throw std::invalid_argument("max_size must be >= 1");
  }
  if (keep < 0 || keep >= max_size) {
    throw std::invalid_argument("keep must be in [0, max_size)");
  }
  if (history < -1) {
    throw std::invalid_argument("history must be >= 0, or -1 for all");
  }
}

int RotatingKVCache::window_start(int pos) const {
  return std::max(keep_, pos - (max_size_ - keep_) + 1);
}

std::pair<mx::array, mx::array>
RotatingKVCache::update_and_fetch(const mx::array& k, const mx::array& v) {
  check(k, v);
  const int o = offset_, n = k.shape(2);
  // Buffer rows: positions [0, keep) then [start_, offset); row(p) below.
  auto row = [this](int p) { return p < keep_ ? p : keep_ + (p - start_); };
  const int cap = keys_ ? keys_->shape(2) : 0;
  if (row(o) + n > cap && o > keep_) {
    // Before growing, drop what neither the window nor the history needs.
    int from = start_;
    if (history_ >= 0) {
      from = std::max(start_, std::min(window_start(o), o) - history_);
    }
    if (from > start_) {
      auto compact = [&](std::optional<mx::array>& buf) {
        auto kept = seq_rows(*buf, row(from), row(o));
        buf = keep_ > 0 ? mx::concatenate({seq_rows(*buf, 0, keep_), kept}, 2)
                        : kept;
      };
      compact(keys_);
      compact(values_);
      start_ = from;
    }
  }
  write(keys_, k, row(o));
  write(values_, v, row(o));
  offset_ += n;
  const int ws = window_start(o);
  if (keep_ == 0 || ws == keep_) {
    const int first = keep_ == 0 ? row(ws) : 0;
    return {seq_rows(*keys_, first, row(offset_)),
            seq_rows(*values_, first, row(offset_))};
  }
  auto sinks_and_window = [&](const mx::array& buf) {
    return mx::concatenate(
        {seq_rows(buf, 0, keep_), seq_rows(buf, row(ws), row(offset_))}, 2);
  };
  return {sinks_and_window(*keys_), sinks_and_window(*values_)};
}

Mask RotatingKVCache::make_mask(int n,
                                std::optional<int> window,
                                bool return_array) const {
  const int w = std::min(window.value_or(max_size_), max_size_);
  const int o = offset_;
  const int ws = window_start(o);
  if (keep_ == 0) {
    const int rel = o - ws; // keys returned start at position ws
    if (n == 1 && rel + 1 <= w && !return_array) {
      return std::monostate{};
    }
    if (n > 1 && rel + n <= w && !return_array) {
      return std::string("causal");
    }
    return causal_mask(n, rel, w);
  }
  // With attention sinks: positions of the returned keys, then the rules.
  auto kpos = ws == keep_ ? mx::arange(o + n, mx::int32)
                          : mx::concatenate({mx::arange(keep_, mx::int32),
                                             mx::arange(ws, o + n, mx::int32)});
  auto qpos = mx::reshape(mx::arange(o, o + n, mx::int32), {n, 1});
  auto kp = mx::reshape(kpos, {1, -1});
  auto in_window =
      mx::less(mx::subtract(qpos, kp), mx::array(w - keep_, mx::int32));
  auto sink = mx::less(kp, mx::array(keep_, mx::int32));
  return mx::logical_and(mx::less_equal(kp, qpos),
                         mx::logical_or(sink, in_window));
}

int RotatingKVCache::trimmable() const {
  if (start_ == keep_) {
    return offset_; // nothing was ever dropped
  }
  // After trimming to o', the window of o' must still be in the buffer.
  return std::max(0, offset_ - (start_ + (max_size_ - keep_) - 1));
}

std::vector<mx::array> RotatingKVCache::state() const {
  if (!keys_) {
    return {};
  }
  const int used = offset_ < keep_ ? offset_ : keep_ + (offset_ - start_);
  return {seq_rows(*keys_, 0, used), seq_rows(*values_, 0, used)};
}

std::map<std::string, int64_t> RotatingKVCache::meta() const {
  return {{"offset", offset_},
          {"start", start_},
          {"max_size", max_size_},
          {"keep", keep_},
          {"history", history_}};
}

void RotatingKVCache::restore(const std::vector<mx::array>& arrays,
                              const std::map<std::string, int64_t>& meta) {
  offset_ = static_cast<int>(get(meta, "offset"));
  start_ = static_cast<int>(get(meta, "start"));
  max_size_ = static_cast<int>(get(meta, "max_size"));
  keep_ = static_cast<int>(get(meta, "keep"));
  history_ = static_cast<int>(get(meta, "history"));
  if (arrays.size() == 2) {
    keys_ = arrays[0];
    values_ = arrays[1];
  } else if (!arrays.empty() || offset_ != 0) {
    throw std::invalid_argument("RotatingKVCache state needs keys and values");
  }
}

// -- QuantizedKVCache ----------------------------------------------------

QuantizedKVCache::QuantizedKVCache(int bits, int group_size)
    : bits_(bits), group_size_(group_size) {
  if (bits != 4 && bits != 8) {
    throw std::invalid_argument("kv bits must be 4 or 8");
  }
  if (group_size != 0 && group_size != 32 && group_size != 64 &&
      group_size != 128) {
    throw std::invalid_argument(
        "kv group_size must be 32, 64 or 128 (or 0: chosen from the head dim)");
  }
}

int kv_group_size(int head_dim, int requested) {
  if (requested == 0) {
    return head_dim % 64 == 0 ? 64 : 32; // padded if 32 does not divide
  }
  if (head_dim % requested) {
    throw std::invalid_argument(
        "head_dim " + std::to_string(head_dim) +
        " is not a multiple of the kv group_size " + std::to_string(requested) +
        "; choose a smaller group_size, or 0 to choose from the head dim");
  }
  return requested;
}

std::vector<mx::array>
quantize_kv(const mx::array& x, int group_size, int bits) {
  // MLX quantizes whole groups of the last axis: pad a narrow head with zeros.
  const int d = x.shape(3);
  const int pad = (group_size - d % group_size) % group_size;
  auto wide = pad == 0 ? x : mx::pad(x, {{0, 0}, {0, 0}, {0, 0}, {0, pad}});
  return mx::quantize(wide, group_size, bits);
}

mx::array dequantize_kv(const mx::array& w,
                        const mx::array& s,
                        const mx::array& b,
                        int group_size,
                        int bits,
                        int head_dim,
                        mx::Dtype dtype) {
  auto out =
      mx::dequantize(w, s, b, group_size, bits, "affine", std::nullopt, dtype);
  if (out.shape(3) == head_dim) {
    return out;
  }
  auto sh = out.shape();
  return mx::slice(out, {0, 0, 0, 0}, {sh[0], sh[1], sh[2], head_dim});
}

std::pair<mx::array, mx::array>
QuantizedKVCache::update_and_fetch(const mx::array& k, const mx::array& v) {
  check(k, v);
  if (head_dim_ == 0) {
    group_size_ = kv_group_size(k.shape(3), group_size_);
    head_dim_ = k.shape(3);
  }
  if (k.shape(3) != head_dim_ || v.shape(3) != head_dim_) {
    throw std::invalid_argument("K/V head_dim changed between updates");
  }
  dtype_ = k.dtype();
  auto qk = quantize_kv(k, group_size_, bits_);
  auto qv = quantize_kv(v, group_size_, bits_);
  write(keys_, qk[0], offset_);
  write(kscales_, qk[1], offset_);
  write(kbiases_, qk[2], offset_);
  write(values_, qv[0], offset_);
  write(vscales_, qv[1], offset_);
  write(vbiases_, qv[2], offset_);
  offset_ += k.shape(2);
  auto deq = [&](const std::optional<mx::array>& w,
                 const std::optional<mx::array>& s,
                 const std::optional<mx::array>& b) {
    return dequantize_kv(seq_rows(*w, 0, offset_),
                         seq_rows(*s, 0, offset_),
                         seq_rows(*b, 0, offset_),
                         group_size_,
                         bits_,
                         head_dim_,
                         dtype_);
  };
  return {deq(keys_, kscales_, kbiases_), deq(values_, vscales_, vbiases_)};
}

Mask QuantizedKVCache::make_mask(int n,
                                 std::optional<int> window,
                                 bool return_array) const {
  return full_mask(n, offset_, window, return_array);
}

std::vector<mx::array> QuantizedKVCache::state() const {
  if (!keys_) {
    return {};
  }
  std::vector<mx::array> out;
  for (auto* a :
       {&keys_, &kscales_, &kbiases_, &values_, &vscales_, &vbiases_}) {
    out.push_back(seq_rows(**a, 0, offset_));
  }
  return out;
}

int64_t QuantizedKVCache::nbytes() const {
  return bytes_of(keys_) + bytes_of(values_) + bytes_of(kscales_) +
         bytes_of(kbiases_) + bytes_of(vscales_) + bytes_of(vbiases_);
}

std::map<std::string, int64_t> QuantizedKVCache::meta() const {
  return {{"offset", offset_},
          {"bits", bits_},
          {"group_size", group_size_},
          {"head_dim", head_dim_}};
}

void QuantizedKVCache::restore(const std::vector<mx::array>& arrays,
                               const std::map<std::string, int64_t>& meta) {
  offset_ = static_cast<int>(get(meta, "offset"));
  bits_ = static_cast<int>(get(meta, "bits"));
  group_size_ = static_cast<int>(get(meta, "group_size"));
  head_dim_ =
      meta.count("head_dim") ? static_cast<int>(meta.at("head_dim")) : 0;
  if (arrays.size() == 6) {
    keys_ = arrays[0];
    kscales_ = arrays[1];
    kbiases_ = arrays[2];
    values_ = arrays[3];
    vscales_ = arrays[4];
    vbiases_ = arrays[5];
    dtype_ = arrays[1].dtype();
  } else if (!arrays.empty() || offset_ != 0) {
    throw std::invalid_argument("QuantizedKVCache state needs 6 arrays");
  }
}

} // namespace mlx_harmony_core
