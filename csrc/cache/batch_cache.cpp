#include "cache/batch_cache.h"

#include "mlx/ops.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace mlx_harmony_core {

namespace {

constexpr int kStep = 256;

int round_up(int n) {
  return (n + kStep - 1) / kStep * kStep;
}

mx::Shape with(mx::Shape s, int axis, int n) {
  s[axis] = n;
  return s;
}

} // namespace

BatchKVCache::BatchKVCache(int window, int history, int bits, int group_size)
    : window_(window), history_(history), bits_(bits), group_size_(group_size) {
  if (window < 0) {
    throw std::invalid_argument("window must be >= 0 (0: full attention)");
  }
  if (history < -1) {
    throw std::invalid_argument("history must be >= 0, or -1 for all");
  }
  if (bits != 0 && bits != 4 && bits != 8) {
    throw std::invalid_argument("kv bits must be 4 or 8 (0: not quantized)");
  }
  if (bits != 0 && window != 0) {
    throw std::invalid_argument(
        "quantized KV is for full-attention layers; sliding layers stay float");
  }
  if (group_size != 0 && group_size != 32 && group_size != 64 &&
      group_size != 128) {
    throw std::invalid_argument(
        "kv group_size must be 32, 64 or 128 (or 0: chosen from the head dim)");
  }
}

std::string BatchKVCache::kind() const {
  return bits_ ? "QuantizedKVCache" : window_ ? "RotatingKVCache" : "KVCache";
}

std::vector<mx::array> BatchKVCache::items(const mx::array& k,
                                           const mx::array& v) {
  if (k.ndim() != 4 || v.ndim() != 4 || k.shape(0) != v.shape(0) ||
      k.shape(1) != v.shape(1) || k.shape(2) != v.shape(2)) {
    throw std::invalid_argument(
        "keys and values must be [batch, kv_heads, tokens, head_dim] and agree "
        "on all but head_dim");
  }
  if (k.shape(0) != size()) {
    throw std::invalid_argument("the update has " + std::to_string(k.shape(0)) +
                                " rows but the batch has " +
                                std::to_string(size()));
  }
  if (head_dim_ != 0 && k.shape(3) != head_dim_) {
    throw std::invalid_argument("keys do not match the batch's head_dim");
  }
  if (!bufs_.empty() && k.shape(1) != bufs_[0].shape(1)) {
    throw std::invalid_argument("keys do not match the batch's kv_heads");
  }
  if (head_dim_ == 0) {
    if (bits_) {
      group_size_ = kv_group_size(k.shape(3), group_size_);
    }
    head_dim_ = k.shape(3);
  }
  if (!bits_) {
    dtype_ = k.dtype();
    return {k, v};
  }
  dtype_ = k.dtype();
  auto qk = quantize_kv(k, group_size_, bits_);
  auto qv = quantize_kv(v, group_size_, bits_);
  return {qk[0], qk[1], qk[2], qv[0], qv[1], qv[2]};
}

int BatchKVCache::first_at(int b, int p) const {
  const auto& c = cols_[b];
  // Positions rise with the column (holes aside): the first one >= p.
  for (int j = 0; j < static_cast<int>(c.size()); ++j) {
    if (c[j] >= 0 && c[j] >= p) {
      return front_ + j;
    }
  }
  return idx_;
}

int BatchKVCache::fetch_start() const {
  int lo = idx_;
  for (int b = 0; b < size(); ++b) {
    const int p = window_ > 0 ? pos_[b] - window_ + 1 : 0;
    lo = std::min(lo, first_at(b, p));
  }
  return lo;
}

int BatchKVCache::held(int b) const {
  if (b < 0 || b >= size()) {
    throw std::invalid_argument("no row " + std::to_string(b) +
                                " in a batch of " + std::to_string(size()));
  }
  int n = 0;
  for (int p : cols_[b]) {
    n += p >= 0;
  }
  return n;
}

void BatchKVCache::compact(int from, int cap) {
  const int B = size();
  std::vector<std::vector<int>> src(B);
  int width = 0;
  for (int b = 0; b < B; ++b) {
    for (int c = from; c < idx_; ++c) {
      if (cols_[b][c - front_] >= 0) {
        src[b].push_back(c - front_);
      }
    }
    width = std::max(width, static_cast<int>(src[b].size()));
  }
  std::vector<std::vector<int>> cols(B, std::vector<int>(width, -1));
  std::vector<int32_t> gather(static_cast<size_t>(B) * width, 0);
  for (int b = 0; b < B; ++b) {
    const int pad = width - static_cast<int>(src[b].size());
    for (int j = 0; j < static_cast<int>(src[b].size()); ++j) {
      cols[b][pad + j] = cols_[b][src[b][j]];
      gather[static_cast<size_t>(b) * width + pad + j] = src[b][j];
    }
  }
  cap = std::max(cap, width);
  for (auto& buf : bufs_) {
    auto fresh = mx::zeros(with(buf.shape(), 2, cap), buf.dtype());
    if (width > 0) {
      std::vector<mx::array> rows;
      for (int b = 0; b < B; ++b) {
        auto idx = mx::array(gather.data() + static_cast<size_t>(b) * width,
                             mx::Shape{width},
                             mx::int32);
        auto sh = buf.shape();
        rows.push_back(
            mx::take(mx::slice(buf, {b, 0, 0, 0}, {b + 1, sh[1], sh[2], sh[3]}),
                     idx,
                     2));
      }
      auto packed = B == 1 ? rows[0] : mx::concatenate(rows, 0);
      fresh = mx::slice_update(
          fresh, packed, mx::Shape{0, 0, 0, 0}, with(buf.shape(), 2, width));
    }
    buf = fresh;
  }
  cols_ = std::move(cols);
  front_ = 0;
  idx_ = width;
}

int BatchKVCache::keep_from() const {
  // A sliding layer keeps window - 1 + history tokens of every row.
  int from = idx_;
  for (int b = 0; b < size(); ++b) {
    const int p = window_ > 0 && history_ >= 0
                      ? pos_[b] - window_ + 1 - history_
                      : std::numeric_limits<int>::min();
    from = std::min(from, first_at(b, p));
  }
  return from;
}

void BatchKVCache::reserve(int n) {
  const int cap = bufs_.empty() ? 0 : bufs_[0].shape(2);
  if (idx_ + n - front_ <= cap) {
    return;
  }
  // Between make_mask and the update the columns must stay where they are: drop
  // only what no window (nor its history) needs, and grow.
  const int old_front = front_;
  const int from = std::max(front_, keep_from());
  for (auto& c : cols_) {
    c.erase(c.begin(), c.begin() + (from - front_));
  }
  front_ = from;
  const int used = idx_ - front_;
  const int new_cap = round_up(std::max(used + n, 2 * used));
  for (auto& buf : bufs_) {
    auto fresh = mx::zeros(with(buf.shape(), 2, new_cap), buf.dtype());
    if (used > 0) {
      const int a = front_ - old_front;
      fresh = mx::slice_update(fresh,
                               seq_rows(buf, a, a + used),
                               mx::Shape{0, 0, 0, 0},
                               with(buf.shape(), 2, used));
    }
    buf = fresh;
  }
}

void BatchKVCache::squeeze() {
  if (bufs_.empty() || size() == 0) {
    return;
  }
  // Holes in the attended columns cost attention: squeeze them out once they
  // waste a quarter of the width (a copy, as growing is).
  const int lo = fetch_start();
  int real = 0;
  for (int b = 0; b < size(); ++b) {
    int r = 0;
    for (int c = lo; c < idx_; ++c) {
      r += cols_[b][c - front_] >= 0;
    }
    real = std::max(real, r);
  }
  const int waste = idx_ - lo - real;
  if (waste < std::max(32, (idx_ - lo) / 4)) {
    return;
  }
  compact(keep_from(), bufs_[0].shape(2));
}

std::pair<mx::array, mx::array>
BatchKVCache::update_and_fetch(const mx::array& k, const mx::array& v) {
  if (size() == 0) {
    throw std::invalid_argument("the batch has no rows: insert() one first");
  }
  auto it = items(k, v);
  const int n = k.shape(2);
  if (bufs_.empty()) {
    for (auto& x : it) {
      bufs_.push_back(mx::zeros(with(x.shape(), 2, 0), x.dtype()));
    }
  }
  reserve(n);
  const int p = idx_ - front_;
  for (size_t i = 0; i < bufs_.size(); ++i) {
    auto stop = bufs_[i].shape();
    stop[2] = p + n;
    bufs_[i] = mx::slice_update(bufs_[i], it[i], mx::Shape{0, 0, p, 0}, stop);
  }
  const int lo = fetch_start() - front_;
  idx_ += n;
  for (int b = 0; b < size(); ++b) {
    for (int i = 0; i < n; ++i) {
      cols_[b].push_back(pos_[b] + i);
    }
    pos_[b] += n;
  }
  const int hi = idx_ - front_;
  handed_ = std::max(handed_, hi);
  if (!bits_) {
    return {seq_rows(bufs_[0], lo, hi), seq_rows(bufs_[1], lo, hi)};
  }
  auto deq = [&](int i) {
    return dequantize_kv(seq_rows(bufs_[i], lo, hi),
                         seq_rows(bufs_[i + 1], lo, hi),
                         seq_rows(bufs_[i + 2], lo, hi),
                         group_size_,
                         bits_,
                         head_dim_,
                         dtype_);
  };
  return {deq(0), deq(3)};
}

std::tuple<mx::array, mx::array, int, int> BatchKVCache::step_reserve(
    const mx::Shape& k_rows, const mx::Shape& v_rows, mx::Dtype t) {
  if (bits_) {
    throw std::invalid_argument(
        "step_reserve takes full-precision rows; a quantized batch updates "
        "through update_and_fetch");
  }
  if (size() == 0) {
    throw std::invalid_argument("the batch has no rows: insert() one first");
  }
  if (!bufs_.empty() && bufs_[0].dtype() != t) {
    throw std::invalid_argument("keys do not match the batch's dtype");
  }
  // items() validates the shapes (and records head_dim and dtype).
  auto it = items(mx::zeros(k_rows, t), mx::zeros(v_rows, t));
  if (bufs_.empty()) {
    for (auto& x : it) {
      bufs_.push_back(mx::zeros(with(x.shape(), 2, 0), x.dtype()));
    }
  }
  const auto before = bufs_[0].id();
  reserve(k_rows[2]);
  if (bufs_[0].id() != before) {
    handed_ = 0; // fresh buffers: no view of them exists
  }
  return {bufs_[0], bufs_[1], idx_ - front_, fetch_start() - front_};
}

void BatchKVCache::step_commit(mx::array keys, mx::array values, int n) {
  bufs_[0] = std::move(keys);
  bufs_[1] = std::move(values);
  idx_ += n;
  for (int b = 0; b < size(); ++b) {
    for (int i = 0; i < n; ++i) {
      cols_[b].push_back(pos_[b] + i);
    }
    pos_[b] += n;
  }
}

Mask BatchKVCache::make_mask(int n,
                             std::optional<int> window,
                             bool return_array) const {
  const int B = size();
  if (B == 0) {
    throw std::invalid_argument("the batch has no rows");
  }
  const int lo = fetch_start();
  const int K = idx_ + n - lo;
  const int w = window.value_or(window_);
  std::vector<uint8_t> m(static_cast<size_t>(B) * n * K);
  bool all = true;
  size_t at = 0;
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < n; ++i) {
      const int q = pos_[b] + i;
      for (int j = 0; j < K; ++j) {
        const int col = lo + j;
        // Keys by position: holes (-1) and other rows' columns never match.
        const int k =
            col < idx_ ? cols_[b][col - front_] : pos_[b] + col - idx_;
        const bool on = k >= 0 && k <= q && (w == 0 || q - k < w);
        all = all && on;
        m[at++] = on;
      }
    }
  }
  if (n == 1 && all && !return_array) {
    return std::monostate{};
  }
  return mx::array(m.begin(), mx::Shape{B, 1, n, K}, mx::bool_);
}

mx::array BatchKVCache::offset() const {
  return mx::array(pos_.begin(), mx::Shape{size()}, mx::int32);
}

void BatchKVCache::insert(const Cache& row) {
  if (row.kind() != kind()) {
    throw std::invalid_argument("a " + row.kind() + " cannot join a batch of " +
                                kind() + " rows");
  }
  if (auto* r = dynamic_cast<const RotatingKVCache*>(&row)) {
    if (r->max_size() != window_ || r->keep() != 0) {
      throw std::invalid_argument("the row's sliding window (" +
                                  std::to_string(r->max_size()) +
                                  " tokens, keep " + std::to_string(r->keep()) +
                                  ") does not match the batch's (" +
                                  std::to_string(window_) + ", keep 0)");
    }
  }
  if (auto* q = dynamic_cast<const QuantizedKVCache*>(&row)) {
    if (q->bits() != bits_) {
      throw std::invalid_argument("the row's kv bits differ from the batch's");
    }
    const int qd = static_cast<int>(q->meta().at("head_dim"));
    if (qd != 0) {
      if (head_dim_ != 0 &&
          (qd != head_dim_ || q->group_size() != group_size_)) {
        throw std::invalid_argument(
            "the row's kv head_dim or group_size differs from the batch's");
      }
      head_dim_ = qd;
      group_size_ = q->group_size();
    }
  }
  auto arrays = row.state();
  const int L = arrays.empty() ? 0 : arrays[0].shape(2);
  const int P = row.offset();
  if (!bufs_.empty() && !arrays.empty()) {
    for (size_t i = 0; i < arrays.size(); ++i) {
      if (arrays[i].shape(1) != bufs_[i].shape(1) ||
          arrays[i].shape(3) != bufs_[i].shape(3)) {
        throw std::invalid_argument(
            "the row's kv_heads or head_dim differ from the batch's");
      }
      arrays[i] = mx::astype(arrays[i], bufs_[i].dtype());
    }
  }
  if (size() == 0) {
    bufs_.clear();
    idx_ = L; // the first row sets the write column
    front_ = 0;
  }
  if (!arrays.empty()) {
    if (!bits_) {
      head_dim_ = arrays[0].shape(3);
    }
    dtype_ = bits_ ? arrays[1].dtype() : arrays[0].dtype();
    if (bufs_.empty()) {
      // Rows so far hold nothing: give them empty columns of this shape.
      for (auto& a : arrays) {
        bufs_.push_back(mx::zeros(
            with(with(a.shape(), 0, size()), 2, round_up(idx_ - front_ + 1)),
            a.dtype()));
      }
    }
    const int start = idx_ - L;
    if (start < front_) {
      // The row is longer than the columns kept: widen every row to the left.
      const int g = front_ - start;
      for (auto& c : cols_) {
        c.insert(c.begin(), g, -1);
      }
      for (auto& buf : bufs_) {
        buf = mx::concatenate(
            {mx::zeros(with(buf.shape(), 2, g), buf.dtype()), buf}, 2);
      }
      front_ = start;
    }
    for (size_t i = 0; i < bufs_.size(); ++i) {
      auto& buf = bufs_[i];
      auto fresh = mx::zeros(with(buf.shape(), 0, 1), buf.dtype());
      auto stop = fresh.shape();
      stop[2] = idx_ - front_;
      fresh = mx::slice_update(
          fresh, arrays[i], mx::Shape{0, 0, start - front_, 0}, stop);
      buf = size() == 0 ? fresh : mx::concatenate({buf, fresh}, 0);
    }
  } else if (!bufs_.empty()) {
    for (auto& buf : bufs_) {
      buf = mx::concatenate(
          {buf, mx::zeros(with(buf.shape(), 0, 1), buf.dtype())}, 0);
    }
  }
  std::vector<int> cols(idx_ - front_, -1);
  for (int j = 0; j < L; ++j) {
    cols[idx_ - L - front_ + j] = P - L + j;
  }
  pos_.push_back(P);
  cols_.push_back(std::move(cols));
}

void BatchKVCache::filter(const std::vector<int>& keep) {
  std::vector<int> pos;
  std::vector<std::vector<int>> cols;
  std::vector<bool> seen(size(), false);
  for (int b : keep) {
    if (b < 0 || b >= size() || seen[b]) {
      throw std::invalid_argument("filter needs distinct row indices in [0, " +
                                  std::to_string(size()) + ")");
    }
    seen[b] = true;
    pos.push_back(pos_[b]);
    cols.push_back(cols_[b]);
  }
  pos_ = std::move(pos);
  cols_ = std::move(cols);
  if (pos_.empty()) {
    bufs_.clear();
    cols_.clear();
    idx_ = front_ = 0;
    return;
  }
  // Columns no remaining row owns go too (the gather copies anyway).
  int from = idx_;
  for (int b = 0; b < size(); ++b) {
    from = std::min(from, first_at(b, std::numeric_limits<int>::min()));
  }
  for (auto& c : cols_) {
    c.erase(c.begin(), c.begin() + (from - front_));
  }
  if (!bufs_.empty()) {
    auto idx = mx::array(
        keep.begin(), mx::Shape{static_cast<int>(keep.size())}, mx::int32);
    for (auto& buf : bufs_) {
      buf = mx::take(seq_rows(buf, from - front_, buf.shape(2)), idx, 0);
    }
  }
  front_ = from;
}

std::unique_ptr<Cache> BatchKVCache::extract(int b) const {
  if (b < 0 || b >= size()) {
    throw std::invalid_argument("no row " + std::to_string(b) +
                                " in a batch of " + std::to_string(size()));
  }
  std::vector<int32_t> own;
  for (int j = 0; j < static_cast<int>(cols_[b].size()); ++j) {
    if (cols_[b][j] >= 0) {
      own.push_back(j);
    }
  }
  const int L = static_cast<int>(own.size()), P = pos_[b];
  handed_ = std::max(handed_, idx_ - front_);
  std::vector<mx::array> arrays;
  if (L > 0) {
    const bool dense = own.back() - own.front() + 1 == L;
    auto idx = mx::array(own.begin(), mx::Shape{L}, mx::int32);
    for (auto& buf : bufs_) {
      auto sh = buf.shape();
      auto row = mx::slice(buf, {b, 0, 0, 0}, {b + 1, sh[1], sh[2], sh[3]});
      // A copy: the row must not keep the whole batch buffer alive.
      arrays.push_back(
          dense ? mx::copy(seq_rows(row, own.front(), own.back() + 1))
                : mx::take(row, idx, 2));
    }
  }
  std::unique_ptr<Cache> out;
  std::map<std::string, int64_t> meta{{"offset", P}};
  if (bits_) {
    out = std::make_unique<QuantizedKVCache>(bits_, group_size_);
    meta.insert({{"bits", bits_},
                 {"group_size", group_size_},
                 {"head_dim", head_dim_}});
  } else if (window_) {
    out = std::make_unique<RotatingKVCache>(window_, 0, history_);
    meta.insert({{"start", P - L},
                 {"max_size", window_},
                 {"keep", 0},
                 {"history", history_}});
  } else {
    out = std::make_unique<KVCache>();
  }
  out->restore(arrays, meta);
  return out;
}

int BatchKVCache::trimmable(int b) const {
  const int h = held(b);
  if (window_ > 0 && h < pos_[b]) {
    // After trimming, the window of the new last position must be held.
    return std::max(0, h - (window_ - 1));
  }
  return pos_[b];
}

int BatchKVCache::trimmable() const {
  if (size() == 0) {
    return 0;
  }
  int t = pos_[0];
  for (int b = 0; b < size(); ++b) {
    t = std::min(t, trimmable(b));
  }
  return t;
}

std::vector<int> BatchKVCache::rewind(const std::vector<int>& n) {
  if (static_cast<int>(n.size()) != size()) {
    throw std::invalid_argument("rewind needs one count per row (" +
                                std::to_string(size()) + "), got " +
                                std::to_string(n.size()));
  }
  std::vector<int> done(size(), 0);
  for (int b = 0; b < size(); ++b) {
    if (n[b] < 0) {
      throw std::invalid_argument("rewind needs counts >= 0");
    }
    const int m = std::min(n[b], trimmable(b));
    // The row's last m tokens become holes (masked until squeezed out).
    int left = m;
    for (int j = static_cast<int>(cols_[b].size()) - 1; j >= 0 && left > 0;
         --j) {
      if (cols_[b][j] >= 0) {
        cols_[b][j] = -1;
        --left;
      }
    }
    pos_[b] -= m;
    done[b] = m;
  }
  // Trailing columns no row holds are free again.
  while (idx_ > front_) {
    bool any = false;
    for (const auto& c : cols_) {
      any = any || c.back() >= 0;
    }
    if (any) {
      break;
    }
    for (auto& c : cols_) {
      c.pop_back();
    }
    --idx_;
  }
  squeeze();
  return done;
}

int BatchKVCache::trim(int n) {
  if (n < 0) {
    throw std::invalid_argument("trim needs n >= 0");
  }
  const int m = std::min(n, trimmable());
  rewind(std::vector<int>(size(), m));
  return m;
}

int64_t BatchKVCache::nbytes() const {
  int64_t total = 0;
  for (auto& buf : bufs_) {
    total += static_cast<int64_t>(buf.nbytes());
  }
  return total;
}

} // namespace mlx_harmony_core
