// Streaming detokenization and multi-token stop matching.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace mlx_harmony_core {

// Decodes UTF-8 like Python's bytes.decode("utf-8", "replace"): each maximal
// invalid subpart becomes one U+FFFD. With `final` false an incomplete but
// still valid tail is left undecoded; returns the number of bytes consumed.
size_t decode_utf8(const std::string& bytes, bool final, std::string& out);

// Token id -> bytes, emitting only complete UTF-8 characters.
class Detokenizer {
public:
  explicit Detokenizer(std::vector<std::string> table);
  // A new stream over the same (shared, immutable) table.
  Detokenizer fresh() const {
    return Detokenizer(table_);
  }

  std::string push(int64_t token);
  std::string push_many(const std::vector<int64_t>& tokens);
  std::string flush(); // the held bytes, invalid ones replaced
  void reset();
  size_t vocab_size() const {
    return table_->size();
  }
  const std::string& token_bytes(int64_t token) const;

private:
  explicit Detokenizer(std::shared_ptr<const std::vector<std::string>> table)
      : table_(std::move(table)) {}
  std::shared_ptr<const std::vector<std::string>> table_;
  std::string pending_;
};

// Aho-Corasick automaton over a byte or token-id alphabet. Node 0 is the root.
class Automaton {
public:
  explicit Automaton(const std::vector<std::vector<int64_t>>& patterns);

  // Advances by one symbol; returns the index of the longest pattern that
  // ends here, or -1.
  int64_t step(int64_t symbol);
  // Length (in symbols) of the longest suffix that is a pattern prefix.
  int64_t depth() const {
    return nodes_[state_].depth;
  }
  int64_t pattern_length(int64_t index) const {
    return lengths_[index];
  }
  void reset() {
    state_ = 0;
  }

private:
  struct Node {
    std::vector<std::pair<int64_t, int32_t>> next; // sorted by symbol
    int32_t fail = 0;
    int32_t out = -1;  // pattern ending exactly here
    int32_t dict = -1; // nearest proper-suffix node with a pattern
    int64_t depth = 0;
  };
  int32_t child(int32_t node, int64_t symbol) const;
  std::vector<Node> nodes_;
  std::vector<int64_t> lengths_;
  int32_t state_ = 0;
};

// Stop strings over streamed text. push() returns the text that can no longer
// be part of a match, and the index of a stop string once one completes.
class StopStrings {
public:
  StopStrings(const std::vector<std::string>& strings, bool include_stop);

  std::pair<std::string, int64_t> push(const std::string& text);
  std::string flush(); // held text, when generation ends for another reason
  void reset();
  const std::string& held() const {
    return held_;
  }

private:
  Automaton automaton_;
  std::vector<std::string> strings_;
  bool include_stop_;
  std::string held_;
};

// Stop sequences over token ids (EOS, Harmony's <|return|>, user sequences).
class TokenStops {
public:
  explicit TokenStops(const std::vector<std::vector<int64_t>>& sequences);

  int64_t push(int64_t token); // index of the completed sequence, or -1
  void reset() {
    automaton_.reset();
  }
  int64_t sequence_length(int64_t index) const {
    return automaton_.pattern_length(index);
  }

private:
  Automaton automaton_;
};

} // namespace mlx_harmony_core
