#include "stop/stop.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_harmony_core {

namespace {

std::optional<int64_t> hit(int64_t i) {
  return i < 0 ? std::nullopt : std::optional<int64_t>(i);
}

} // namespace

void init_stop(nb::module_& m) {
  nb::class_<Detokenizer>(
      m,
      "Detokenizer",
      "Streaming detokenizer: token id -> bytes, emitting only complete UTF-8 "
      "characters.\n\nInvalid bytes become U+FFFD exactly as "
      "``bytes.decode('utf-8', 'replace')`` would place them, so the pieces "
      "always concatenate to the decode of the whole sequence.")
      .def(
          "__init__",
          [](Detokenizer* self, const std::vector<nb::bytes>& table) {
            std::vector<std::string> t;
            t.reserve(table.size());
            for (auto& b : table) {
              t.emplace_back(b.c_str(), b.size());
            }
            new (self) Detokenizer(std::move(t));
          },
          "token_bytes"_a,
          "``token_bytes[i]`` is the byte string of token ``i``.")
      .def("fresh",
           &Detokenizer::fresh,
           "A new, empty stream sharing this table (no copy).")
      .def("push",
           &Detokenizer::push,
           "token"_a,
           "Add one token; return the text it completes (maybe empty).")
      .def("push_many",
           &Detokenizer::push_many,
           "tokens"_a,
           "Add several tokens at once.")
      .def("flush",
           &Detokenizer::flush,
           "Return the held bytes (an unfinished character becomes U+FFFD).")
      .def("reset", &Detokenizer::reset, "Drop the held bytes.")
      .def_prop_ro("vocab_size", &Detokenizer::vocab_size)
      .def(
          "token_bytes",
          [](const Detokenizer& d, int64_t t) {
            const auto& s = d.token_bytes(t);
            return nb::bytes(s.data(), s.size());
          },
          "token"_a,
          "The bytes of one token.");

  nb::class_<StopStrings>(
      m,
      "StopStrings",
      "Stop strings over streamed text (Aho-Corasick over UTF-8 bytes).\n\n"
      "``push(text)`` returns ``(safe_text, index)``: the text that can no "
      "longer become part of a match, and the index of the stop string that "
      "completed (None while none has). It holds back exactly the longest "
      "suffix that could still grow into a match.")
      .def(nb::init<const std::vector<std::string>&, bool>(),
           "strings"_a,
           "include_stop"_a = false)
      .def(
          "push",
          [](StopStrings& s, const std::string& text) {
            auto [out, i] = s.push(text);
            return std::make_pair(out, hit(i));
          },
          "text"_a)
      .def("flush",
           &StopStrings::flush,
           "Release the held text (generation ended for another reason).")
      .def("reset", &StopStrings::reset)
      .def_prop_ro("held",
                   &StopStrings::held,
                   "The text held back because it may start a stop string.");

  nb::class_<TokenStops>(
      m,
      "TokenStops",
      "Stop sequences over token ids (Aho-Corasick): ``push(token)`` returns "
      "the index of the sequence that just completed (the longest one ending "
      "there), or None.")
      .def(nb::init<const std::vector<std::vector<int64_t>>&>(), "sequences"_a)
      .def(
          "push",
          [](TokenStops& s, int64_t token) { return hit(s.push(token)); },
          "token"_a)
      .def("reset", &TokenStops::reset)
      .def("sequence_length", &TokenStops::sequence_length, "index"_a);

  m.def(
      "decode_utf8",
      [](nb::bytes data, bool final) {
        std::string out;
        const size_t used =
            decode_utf8(std::string(data.c_str(), data.size()), final, out);
        return std::make_pair(out, used);
      },
      "data"_a,
      "final"_a = true,
      "Decode like bytes.decode('utf-8', 'replace'); with final=False an "
      "incomplete tail is left. Returns (text, bytes consumed).");
}

} // namespace mlx_harmony_core
