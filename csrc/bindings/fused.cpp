#include "fused/fused.h"

#include "cache/batch_cache.h"
#include "cache/kv_cache.h"
#include "fused/block.h"
#include "mlx/ops.h"

#include <algorithm>
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>
#include <typeinfo>
#include <variant>

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_harmony_core {

namespace mx = mlx::core;

namespace {

// A quantized linear from Python: (w, scales, biases, bias, group_size, bits,
// mode), biases and bias None where absent.
using LinearTuple = std::tuple<mx::array,
                               mx::array,
                               std::optional<mx::array>,
                               std::optional<mx::array>,
                               int,
                               int,
                               std::string>;

fused::QLinear linear(const LinearTuple& t) {
  return {std::get<0>(t),
          std::get<1>(t),
          std::get<2>(t),
          std::get<3>(t),
          std::get<4>(t),
          std::get<5>(t),
          std::get<6>(t)};
}

// A linear a FusedBlock keeps across steps: its implicit biases found once.
fused::QLinear kept(const LinearTuple& t) {
  return fused::with_zero(linear(t));
}

mx::array offset_array(const std::variant<int, mx::array>& offset) {
  return std::holds_alternative<int>(offset)
             ? mx::array(std::get<int>(offset), mx::int32)
             : std::get<mx::array>(offset);
}

using MaskArg = std::variant<std::monostate, std::string, mx::array>;

// An attention mask from Python as fused::sdpa takes it: (mode, array).
std::pair<std::string, std::optional<mx::array>> mask_of(const MaskArg& mask) {
  if (std::holds_alternative<std::string>(mask)) {
    const std::string& mode = std::get<std::string>(mask);
    if (mode != "causal") {
      throw nb::value_error(
          "mask must be None, 'causal' or an array (bool or additive)");
    }
    return {mode, std::nullopt};
  }
  if (std::holds_alternative<mx::array>(mask)) {
    return {"array", std::get<mx::array>(mask)};
  }
  return {"", std::nullopt};
}

// A llama-style decoder block's weights and settings, converted from Python
// once: step() runs its decode step (attn_in, the cache update, attention,
// attn_out_mlp) in one call instead of three calls and ~40 argument
// conversions per layer and token.
struct Block : fused::Layer {
  mx::array step(const mx::array& x, Cache* cache, const MaskArg& mask) const {
    const mx::array offset(cache ? cache->offset() : 0, mx::int32);
    auto qkv_out =
        fused::attn_in(x, norm1, eps1, qkv, heads, kv_heads, rope, offset);
    mx::array k = qkv_out[1], v = qkv_out[2];
    if (cache) {
      std::tie(k, v) = cache->update_and_fetch(k, v);
    }
    auto [mode, arr] = mask_of(mask);
    auto attn = fused::sdpa(qkv_out[0], k, v, scale, mode, arr, std::nullopt);
    return fused::attn_out_mlp(attn, x, o, norm2, eps2, gate, up, down);
  }
};

// Whether a transform (grad, vmap) traces x, the mask or a layer's arrays:
// the one-primitive step keeps its weights outside the graph and has no
// transforms, so those calls run the blocks one by one (with fallbacks).
bool traced(const mx::array& x,
            const std::vector<Block*>& blocks,
            const MaskArg& mask) {
  if (x.is_tracer()) {
    return true;
  }
  if (auto* m = std::get_if<mx::array>(&mask); m && m->is_tracer()) {
    return true;
  }
  auto lin = [](const fused::QLinear& l) {
    return l.w.is_tracer() || l.scales.is_tracer() ||
           (l.biases && l.biases->is_tracer()) ||
           (l.bias && l.bias->is_tracer());
  };
  for (const Block* b : blocks) {
    if (b->norm1.is_tracer() || b->norm2.is_tracer() ||
        (b->rope.freqs && b->rope.freqs->is_tracer()) || lin(b->o) ||
        lin(b->gate) || lin(b->up) || lin(b->down) ||
        std::any_of(b->qkv.begin(), b->qkv.end(), lin)) {
      return true;
    }
  }
  return false;
}

// Every block's step over x in one primitive (fused::stack_step), each with
// its cache: all KVCache (exactly that class) at one offset, or all
// full-precision full-attention BatchKVCache with the same columns; their
// rows are written in place. Nothing (the caches untouched but for
// capacity) where that path does not take them.
std::optional<mx::array> stack_step(const std::vector<Block*>& blocks,
                                    const mx::array& x,
                                    const std::vector<nb::handle>& caches,
                                    const MaskArg& mask,
                                    mx::StreamOrDevice s) {
  if (blocks.size() != caches.size()) {
    throw nb::value_error("stack_step takes one cache per block");
  }
  if (blocks.empty() || x.ndim() != 3 || x.shape(1) < 1 ||
      x.shape(1) > fused::kMaxBlockRows || traced(x, blocks, mask)) {
    return std::nullopt;
  }
  std::vector<KVCache*> kv;
  std::vector<BatchKVCache*> batch;
  for (nb::handle h : caches) {
    if (nb::type_check(h.type()) && h.type().is(nb::type<KVCache>())) {
      kv.push_back(nb::cast<KVCache*>(h));
    } else if (h.type().is(nb::type<BatchKVCache>())) {
      auto* c = nb::cast<BatchKVCache*>(h);
      if (c->bits() || c->window() > 0 || c->size() != x.shape(0)) {
        return std::nullopt;
      }
      batch.push_back(c);
    } else {
      return std::nullopt;
    }
  }
  if (!kv.empty() && !batch.empty()) {
    return std::nullopt;
  }
  for (auto* c : kv) {
    if (c->offset() != kv[0]->offset()) {
      return std::nullopt;
    }
  }
  for (auto* c : batch) {
    if (c->positions() != batch[0]->positions() ||
        c->width() != batch[0]->width() ||
        (!c->state().empty() && c->state()[0].dtype() != x.dtype())) {
      return std::nullopt;
    }
  }
  const int B = x.shape(0), L = x.shape(1);
  std::vector<const fused::Layer*> layers;
  std::vector<std::pair<mx::array, mx::array>> bufs;
  int at = -1, lo = -1;
  int handed = 0; // the most columns any cache handed out as views
  for (size_t i = 0; i < blocks.size(); ++i) {
    const Block& b = *blocks[i];
    const int hd = b.qkv[0].w.shape(0) / b.heads;
    const int hdv = b.qkv[2].w.shape(0) / b.kv_heads;
    const mx::Shape kr{B, b.kv_heads, L, hd}, vr{B, b.kv_heads, L, hdv};
    layers.push_back(&b);
    if (!kv.empty()) {
      bufs.push_back(kv[i]->reserve(kr, vr, x.dtype()));
      handed = std::max(handed, kv[i]->handed());
      at = kv[0]->offset();
      lo = 0;
    } else {
      auto [k, v, a, l] = batch[i]->step_reserve(kr, vr, x.dtype());
      if (i > 0 && (a != at || l != lo)) {
        return std::nullopt;
      }
      bufs.emplace_back(k, v);
      handed = std::max(handed, batch[i]->handed());
      at = a;
      lo = l;
    }
  }
  const mx::array positions =
      kv.empty() ? batch[0]->offset() : mx::array(kv[0]->offset(), mx::int32);
  auto [mode, arr] = mask_of(mask);
  auto out = fused::stack_step(
      layers, x, positions, bufs, at, lo, mode, arr, handed <= at, s);
  if (!out) {
    return std::nullopt;
  }
  bufs.clear(); // the old buffers: only the step holds them (MLX donates them)
  for (size_t i = 0; i < blocks.size(); ++i) {
    auto k = (*out)[1 + 2 * i], v = (*out)[2 + 2 * i];
    if (!kv.empty()) {
      kv[i]->commit(k, v, L);
    } else {
      batch[i]->step_commit(k, v, L);
    }
  }
  return (*out)[0];
}

// Whether every (obj, key, value) entry of `checks` still holds: key None:
// type(obj) is value; a str: obj (a dict: nn.Module) .get(key) is value; an
// int: obj (a list) [key] is value. A model's decode step checks ~1500 such
// entries per token (its memo of every layer's weights): ~1 ms in Python.
bool same_objects(nb::handle checks) {
  PyObject* seq = checks.ptr();
  if (!PyTuple_Check(seq)) {
    throw nb::type_error("checks must be a tuple of (obj, key, value)");
  }
  const Py_ssize_t n = PyTuple_Size(seq);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* e = PyTuple_GetItem(seq, i);
    if (!PyTuple_Check(e) || PyTuple_Size(e) != 3) {
      throw nb::type_error("checks must be a tuple of (obj, key, value)");
    }
    PyObject* obj = PyTuple_GetItem(e, 0);
    PyObject* key = PyTuple_GetItem(e, 1);
    PyObject* value = PyTuple_GetItem(e, 2);
    PyObject* live = nullptr;
    if (key == Py_None) {
      live = reinterpret_cast<PyObject*>(Py_TYPE(obj));
    } else if (PyLong_Check(key)) {
      const Py_ssize_t k = PyLong_AsSsize_t(key);
      if (!PyList_Check(obj) || k < 0 || k >= PyList_Size(obj)) {
        PyErr_Clear();
        return false;
      }
      live = PyList_GetItem(obj, k);
    } else {
      if (!PyDict_Check(obj)) {
        return false;
      }
      live = PyDict_GetItemWithError(obj, key); // borrowed
      if (live == nullptr && PyErr_Occurred()) {
        throw nb::python_error();
      }
      if (live == nullptr) {
        live = Py_None; // absent reads as None, as dict.get
      }
    }
    if (live != value) {
      return false;
    }
  }
  return true;
}

} // namespace

void init_fused(nb::module_& m) {
  m.def("same_objects",
        &same_objects,
        "checks"_a,
        "Whether every (obj, key, value) of the tuple ``checks`` still holds: "
        "key None: ``type(obj) is value``; a str: ``obj.get(key) is value`` "
        "(obj a dict, e.g. an nn.Module); an int: ``obj[key] is value`` (obj "
        "a list). One C loop for a model's memo of its layers' arrays.");

  nb::class_<Block>(m,
                    "FusedBlock",
                    "A llama-style decoder block for the fused decode step "
                    "(see block_attn_in and block_attn_out_mlp).")
      .def(
          "__init__",
          [](Block* self,
             const mx::array& norm1,
             float eps1,
             const LinearTuple& q,
             const LinearTuple& k,
             const LinearTuple& v,
             int heads,
             int kv_heads,
             int rope_dims,
             bool rope_traditional,
             std::optional<float> rope_base,
             float rope_scale,
             const std::optional<mx::array>& rope_freqs,
             const LinearTuple& o,
             const mx::array& norm2,
             float eps2,
             const LinearTuple& gate,
             const LinearTuple& up,
             const LinearTuple& down,
             float scale) {
            if (heads <= 0 || kv_heads <= 0) {
              throw nb::value_error("head counts must be positive");
            }
            new (self) Block{fused::Layer{norm1,
                                          eps1,
                                          {kept(q), kept(k), kept(v)},
                                          heads,
                                          kv_heads,
                                          {rope_dims,
                                           rope_traditional,
                                           rope_base,
                                           rope_scale,
                                           rope_freqs},
                                          kept(o),
                                          norm2,
                                          eps2,
                                          kept(gate),
                                          kept(up),
                                          kept(down),
                                          scale}};
          },
          "norm1"_a,
          "eps1"_a,
          "q"_a,
          "k"_a,
          "v"_a,
          "n_heads"_a,
          "n_kv_heads"_a,
          "rope_dims"_a,
          "rope_traditional"_a,
          "rope_base"_a.none(),
          "rope_scale"_a,
          "rope_freqs"_a.none(),
          "o"_a,
          "norm2"_a,
          "eps2"_a,
          "gate"_a,
          "up"_a,
          "down"_a,
          "scale"_a)
      .def_prop_ro(
          "implicit_zeros",
          [](const Block& b) {
            return std::vector<int>{b.qkv[0].zero,
                                    b.qkv[1].zero,
                                    b.qkv[2].zero,
                                    b.o.zero,
                                    b.gate.zero,
                                    b.up.zero,
                                    b.down.zero};
          },
          "Per linear (q, k, v, o, gate, up, down): z where its biases are "
          "exactly -z * scales and the kernels derive them instead of "
          "reading them (0: read).")
      .def("step",
           &Block::step,
           "x"_a,
           "cache"_a.none(),
           "mask"_a.none(),
           "The block on x (B, L, D): block_attn_in at the cache's offset, "
           "the cache's update_and_fetch (ours; None: no cache), attention "
           "with ``mask`` (None, 'causal' or an array), block_attn_out_mlp.");

  m.def("fused_stack_step",
        &stack_step,
        "blocks"_a,
        "x"_a,
        "caches"_a,
        "mask"_a.none() = nb::none(),
        nb::kw_only(),
        "stream"_a = nb::none(),
        "Every FusedBlock's step over x (B, L, D), L <= 16, as one primitive "
        "on a CPU stream: each block's keys and values written into its cache "
        "in place (all KVCache at one offset, or all full-precision "
        "full-attention BatchKVCache), attention with ``mask`` (None, "
        "'causal' or an array, as the model made it for the first cache); "
        "the last block's output, or None where that path does not take the "
        "arguments (then run the blocks one by one).");

  m.def("fused_stack_copies",
        &fused::stack_copies,
        "Key/value buffers holding rows that fused_stack_step copied because "
        "MLX could not update them in place (something else held them); a "
        "decode loop should keep this at 0.");

  m.def("rms_norm",
        &fused::rms_norm,
        "x"_a,
        "weight"_a.none(),
        "eps"_a,
        nb::kw_only(),
        "stream"_a = nb::none(),
        "``mx.fast.rms_norm`` as one fused primitive on a CPU stream (MLX's "
        "op elsewhere).");
  m.def("swiglu",
        &fused::swiglu,
        "gate"_a,
        "x"_a,
        nb::kw_only(),
        "stream"_a = nb::none(),
        "``silu(gate) * x`` (mlx-lm's ``swiglu``) as one fused primitive on a "
        "CPU stream, threaded over rows (MLX's ops elsewhere).");
  m.def(
      "rope",
      [](const mx::array& x,
         int dims,
         bool traditional,
         std::optional<float> base,
         float scale,
         const std::variant<int, mx::array>& offset,
         const std::optional<mx::array>& freqs,
         mx::StreamOrDevice s) {
        const mx::array off = std::holds_alternative<int>(offset)
                                  ? mx::array(std::get<int>(offset), mx::int32)
                                  : std::get<mx::array>(offset);
        return fused::rope(x, dims, traditional, base, scale, off, freqs, s);
      },
      "x"_a,
      "dims"_a,
      nb::kw_only(),
      "traditional"_a,
      "base"_a.none(),
      "scale"_a,
      "offset"_a,
      "freqs"_a = nb::none(),
      "stream"_a = nb::none(),
      "``mx.fast.rope`` as one fused primitive on a CPU stream (MLX's op "
      "elsewhere).");
  m.def(
      "scaled_dot_product_attention",
      [](const mx::array& q,
         const mx::array& k,
         const mx::array& v,
         float scale,
         const MaskArg& mask,
         const std::optional<mx::array>& sinks,
         mx::StreamOrDevice s) {
        auto [mode, arr] = mask_of(mask);
        return fused::sdpa(q, k, v, scale, mode, arr, sinks, s);
      },
      "q"_a,
      "k"_a,
      "v"_a,
      nb::kw_only(),
      "scale"_a,
      "mask"_a = nb::none(),
      "sinks"_a = nb::none(),
      "stream"_a = nb::none(),
      "``mx.fast.scaled_dot_product_attention``: one fused primitive on a CPU "
      "stream for up to 16 query rows (decode), MLX's op otherwise.");

  m.def(
      "block_attn_in",
      [](const mx::array& x,
         const mx::array& norm_weight,
         float eps,
         const LinearTuple& q,
         const LinearTuple& k,
         const LinearTuple& v,
         int n_heads,
         int n_kv_heads,
         int rope_dims,
         bool rope_traditional,
         std::optional<float> rope_base,
         float rope_scale,
         const std::variant<int, mx::array>& offset,
         const std::optional<mx::array>& rope_freqs,
         mx::StreamOrDevice s) {
        auto out = fused::attn_in(
            x,
            norm_weight,
            eps,
            {linear(q), linear(k), linear(v)},
            n_heads,
            n_kv_heads,
            {rope_dims, rope_traditional, rope_base, rope_scale, rope_freqs},
            offset_array(offset),
            s);
        return std::make_tuple(out[0], out[1], out[2]);
      },
      "x"_a,
      "norm_weight"_a,
      "eps"_a,
      "q"_a,
      "k"_a,
      "v"_a,
      "n_heads"_a,
      "n_kv_heads"_a,
      "rope_dims"_a,
      "rope_traditional"_a,
      "rope_base"_a.none(),
      "rope_scale"_a,
      "offset"_a,
      "rope_freqs"_a = nb::none(),
      nb::kw_only(),
      "stream"_a = nb::none(),
      "A decoder block's attention input for a few rows: RMSNorm(x) * "
      "norm_weight through the quantized q/k/v linears (each a tuple (w, "
      "scales, biases, bias, group_size, bits, mode)), heads split and "
      "RoPE'd at ``offset``: (q, k, v) as (B, heads, L, head_dim). One "
      "primitive on a CPU stream for up to 16 rows; MLX-level ops "
      "otherwise.");
  m.def(
      "block_attn_out_mlp",
      [](const mx::array& attn,
         const mx::array& x,
         const LinearTuple& o,
         const mx::array& norm_weight,
         float eps,
         const LinearTuple& gate,
         const LinearTuple& up,
         const LinearTuple& down,
         mx::StreamOrDevice s) {
        return fused::attn_out_mlp(attn,
                                   x,
                                   linear(o),
                                   norm_weight,
                                   eps,
                                   linear(gate),
                                   linear(up),
                                   linear(down),
                                   s);
      },
      "attn"_a,
      "x"_a,
      "o"_a,
      "norm_weight"_a,
      "eps"_a,
      "gate"_a,
      "up"_a,
      "down"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "The rest of a llama-style decoder block for a few rows: h = x + "
      "o(attn as (B, L, heads * head_dim)); h + down(silu(gate(n)) * up(n)) "
      "with n = RMSNorm(h) * norm_weight. One primitive on a CPU stream for up "
      "to 16 rows; MLX-level ops otherwise.");
}

} // namespace mlx_harmony_core
