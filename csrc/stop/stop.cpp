#include "stop/stop.h"

#include <algorithm>
#include <deque>
#include <stdexcept>

namespace mlx_harmony_core {

namespace {

const char kReplacement[] = "\xEF\xBF\xBD"; // U+FFFD

// Length of the well-formed sequence a lead byte starts (0: not a lead), and
// the valid range of the second byte (Unicode Table 3-7).
int sequence_length(uint8_t b, uint8_t& lo, uint8_t& hi) {
  lo = 0x80;
  hi = 0xBF;
  if (b < 0x80) {
    return 1;
  }
  if (b >= 0xC2 && b <= 0xDF) {
    return 2;
  }
  if (b >= 0xE0 && b <= 0xEF) {
    if (b == 0xE0) {
      lo = 0xA0;
    } else if (b == 0xED) {
      hi = 0x9F;
    }
    return 3;
  }
  if (b >= 0xF0 && b <= 0xF4) {
    if (b == 0xF0) {
      lo = 0x90;
    } else if (b == 0xF4) {
      hi = 0x8F;
    }
    return 4;
  }
  return 0;
}

} // namespace

size_t decode_utf8(const std::string& bytes, bool final, std::string& out) {
  const size_t n = bytes.size();
  size_t i = 0;
  while (i < n) {
    const auto b = static_cast<uint8_t>(bytes[i]);
    uint8_t lo, hi;
    const int len = sequence_length(b, lo, hi);
    if (len == 1) {
      out.push_back(static_cast<char>(b));
      ++i;
      continue;
    }
    if (len == 0) {
      out += kReplacement;
      ++i;
      continue;
    }
    // Count the valid bytes of this sequence (its maximal subpart).
    size_t j = 1;
    while (j < static_cast<size_t>(len) && i + j < n) {
      const auto c = static_cast<uint8_t>(bytes[i + j]);
      const uint8_t clo = j == 1 ? lo : 0x80, chi = j == 1 ? hi : 0xBF;
      if (c < clo || c > chi) {
        break;
      }
      ++j;
    }
    if (j == static_cast<size_t>(len)) {
      out.append(bytes, i, len);
      i += len;
    } else if (i + j == n && !final) {
      return i; // incomplete but possibly valid: wait for more bytes
    } else {
      out += kReplacement;
      i += j;
    }
  }
  return i;
}

Detokenizer::Detokenizer(std::vector<std::string> table)
    : table_(
          std::make_shared<const std::vector<std::string>>(std::move(table))) {
  if (table_->empty()) {
    throw std::invalid_argument("the token -> bytes table is empty");
  }
}

const std::string& Detokenizer::token_bytes(int64_t token) const {
  if (token < 0 || token >= static_cast<int64_t>(table_->size())) {
    throw std::out_of_range("token id " + std::to_string(token) +
                            " is outside the vocabulary [0, " +
                            std::to_string(table_->size()) + ")");
  }
  return (*table_)[token];
}

std::string Detokenizer::push(int64_t token) {
  pending_ += token_bytes(token);
  std::string out;
  const size_t used = decode_utf8(pending_, false, out);
  pending_.erase(0, used);
  return out;
}

std::string Detokenizer::push_many(const std::vector<int64_t>& tokens) {
  for (auto t : tokens) {
    token_bytes(t); // validate all before changing state
  }
  for (auto t : tokens) {
    pending_ += (*table_)[t];
  }
  std::string out;
  const size_t used = decode_utf8(pending_, false, out);
  pending_.erase(0, used);
  return out;
}

std::string Detokenizer::flush() {
  std::string out;
  decode_utf8(pending_, true, out);
  pending_.clear();
  return out;
}

void Detokenizer::reset() {
  pending_.clear();
}

Automaton::Automaton(const std::vector<std::vector<int64_t>>& patterns) {
  nodes_.emplace_back();
  for (size_t p = 0; p < patterns.size(); ++p) {
    if (patterns[p].empty()) {
      throw std::invalid_argument("stop pattern " + std::to_string(p) +
                                  " is empty");
    }
    int32_t node = 0;
    for (auto sym : patterns[p]) {
      int32_t nxt = child(node, sym);
      if (nxt < 0) {
        nxt = static_cast<int32_t>(nodes_.size());
        nodes_.emplace_back();
        nodes_[nxt].depth = nodes_[node].depth + 1;
        auto& edges = nodes_[node].next;
        edges.insert(std::lower_bound(edges.begin(),
                                      edges.end(),
                                      std::make_pair(sym, int32_t(-1))),
                     {sym, nxt});
      }
      node = nxt;
    }
    if (nodes_[node].out < 0) {
      nodes_[node].out = static_cast<int32_t>(p);
    }
    lengths_.push_back(static_cast<int64_t>(patterns[p].size()));
  }
  // Breadth-first: failure links and the dictionary (output) links.
  std::deque<int32_t> queue;
  for (auto& [sym, c] : nodes_[0].next) {
    queue.push_back(c);
  }
  while (!queue.empty()) {
    const int32_t u = queue.front();
    queue.pop_front();
    for (auto& [sym, v] : nodes_[u].next) {
      int32_t f = nodes_[u].fail;
      int32_t g = child(f, sym);
      while (g < 0 && f != 0) {
        f = nodes_[f].fail;
        g = child(f, sym);
      }
      nodes_[v].fail = (g >= 0 && g != v) ? g : 0;
      const auto& fn = nodes_[nodes_[v].fail];
      nodes_[v].dict = fn.out >= 0 ? nodes_[v].fail : fn.dict;
      queue.push_back(v);
    }
  }
}

int32_t Automaton::child(int32_t node, int64_t symbol) const {
  const auto& edges = nodes_[node].next;
  auto it = std::lower_bound(
      edges.begin(), edges.end(), std::make_pair(symbol, int32_t(-1)));
  return (it != edges.end() && it->first == symbol) ? it->second : -1;
}

int64_t Automaton::step(int64_t symbol) {
  int32_t s = state_;
  int32_t c = child(s, symbol);
  while (c < 0 && s != 0) {
    s = nodes_[s].fail;
    c = child(s, symbol);
  }
  state_ = c >= 0 ? c : 0;
  const auto& node = nodes_[state_];
  if (node.out >= 0) {
    return node.out; // the longest pattern ending here is the node's own
  }
  return node.dict >= 0 ? nodes_[node.dict].out : -1;
}

namespace {

std::vector<std::vector<int64_t>>
as_byte_patterns(const std::vector<std::string>& strings) {
  if (strings.empty()) {
    throw std::invalid_argument("give at least one stop string");
  }
  std::vector<std::vector<int64_t>> out;
  for (size_t i = 0; i < strings.size(); ++i) {
    if (strings[i].empty()) {
      throw std::invalid_argument("stop string " + std::to_string(i) +
                                  " is empty");
    }
    out.emplace_back(strings[i].begin(), strings[i].end());
    for (auto& b : out.back()) {
      b &= 0xFF;
    }
  }
  return out;
}

} // namespace

StopStrings::StopStrings(const std::vector<std::string>& strings,
                         bool include_stop)
    : automaton_(as_byte_patterns(strings)), strings_(strings),
      include_stop_(include_stop) {}

std::pair<std::string, int64_t> StopStrings::push(const std::string& text) {
  const size_t base = held_.size();
  std::string pending = held_ + text;
  for (size_t i = 0; i < text.size(); ++i) {
    const int64_t hit = automaton_.step(static_cast<uint8_t>(text[i]));
    if (hit >= 0) {
      const size_t end = base + i + 1;
      const size_t len = strings_[hit].size();
      std::string out = pending.substr(0, include_stop_ ? end : end - len);
      held_.clear();
      automaton_.reset();
      return {std::move(out), hit};
    }
  }
  const size_t keep = static_cast<size_t>(automaton_.depth());
  held_ = pending.substr(pending.size() - keep);
  pending.resize(pending.size() - keep);
  return {std::move(pending), -1};
}

std::string StopStrings::flush() {
  std::string out;
  out.swap(held_);
  automaton_.reset();
  return out;
}

void StopStrings::reset() {
  held_.clear();
  automaton_.reset();
}

TokenStops::TokenStops(const std::vector<std::vector<int64_t>>& sequences)
    : automaton_(sequences.empty()
                     ? throw std::invalid_argument(
                           "give at least one stop token sequence")
                     : sequences) {}

int64_t TokenStops::push(int64_t token) {
  return automaton_.step(token);
}

} // namespace mlx_harmony_core
