#include "quant/quant.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "quant/matmul.h"

#include <cstring>
#include <stdexcept>
#include <string_view>

namespace mlx_harmony_core {

namespace {

using quant::Format;
using quant::QMatrix;
using quant::ScaleType;

// MLX's node for the same call, when our kernels can take it: its shape and
// dtype are the result's, its checks the arguments'.
bool is_node(const mx::array& a, std::string_view name) {
  return a.has_primitive() && name == a.primitive().name();
}

bool float_like(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16;
}

bool scales_ok(const std::string& mode, const mx::array& scales) {
  return mode == "mxfp4" ? scales.dtype() == mx::uint8
                         : float_like(scales.dtype());
}

// a's values as row-major float32: a itself when it is that already.
const float* as_float(const mx::array& a, std::vector<float>& out) {
  std::vector<uint8_t> buf;
  const uint8_t* p = row_major(a, buf);
  if (a.dtype() == mx::float32) {
    if (p != buf.data()) {
      return reinterpret_cast<const float*>(p);
    }
    out.assign(reinterpret_cast<const float*>(p),
               reinterpret_cast<const float*>(p) + a.size());
    return out.data();
  }
  out.resize(a.size());
  if (a.dtype() == mx::float16) {
    auto* h = reinterpret_cast<const mx::float16_t*>(p);
    for (size_t i = 0; i < a.size(); ++i) {
      out[i] = static_cast<float>(h[i]);
    }
  } else {
    auto* h = reinterpret_cast<const mx::bfloat16_t*>(p);
    for (size_t i = 0; i < a.size(); ++i) {
      out[i] = static_cast<float>(h[i]);
    }
  }
  return out.data();
}

void store(const float* y, mx::array& out) {
  if (out.dtype() == mx::float16) {
    auto* o = out.data<mx::float16_t>();
    for (size_t i = 0; i < out.size(); ++i) {
      o[i] = static_cast<mx::float16_t>(y[i]);
    }
  } else if (out.dtype() == mx::bfloat16) {
    auto* o = out.data<mx::bfloat16_t>();
    for (size_t i = 0; i < out.size(); ++i) {
      o[i] = static_cast<mx::bfloat16_t>(y[i]);
    }
  }
}

ScaleType scale_type(mx::Dtype t) {
  if (t == mx::float16) {
    return ScaleType::F16;
  }
  if (t == mx::bfloat16) {
    return ScaleType::BF16;
  }
  return t == mx::uint8 ? ScaleType::E8M0 : ScaleType::F32;
}

// Row-major data of the weights, scales and biases (copies where strided).
struct Weights {
  std::vector<uint8_t> wbuf, sbuf, bbuf;
  const uint8_t *w = nullptr, *s = nullptr, *b = nullptr;
  Weights(const mx::array& w_, const mx::array& s_, const mx::array* b_) {
    w = row_major(w_, wbuf);
    s = row_major(s_, sbuf);
    b = b_ ? row_major(*b_, bbuf) : nullptr;
  }
};

// Matrix e of the weights (their last two dims), in the kernel's terms.
QMatrix matrix(const Weights& wt,
               const mx::array& w,
               const mx::array& scales,
               const QuantSpec& spec,
               int64_t e) {
  QMatrix a;
  const bool wide = spec.group_size >= 32; // Affine4/Affine8 take 32 and up
  a.format = spec.mode == "mxfp4"     ? Format::Mxfp4
             : spec.bits == 8 && wide ? Format::Affine8
             : spec.bits == 4 && wide ? Format::Affine4
                                      : Format::AffineN;
  a.bits = spec.bits;
  a.group = spec.group_size;
  a.scale_type = scale_type(scales.dtype());
  a.rows = w.shape(-2);
  a.cols = int64_t(w.shape(-1)) * 32 / spec.bits;
  const int64_t wmat = int64_t(w.shape(-1)) * w.shape(-2) * 4;
  const int64_t smat =
      int64_t(scales.shape(-1)) * scales.shape(-2) * scales.itemsize();
  a.w = wt.w + e * wmat;
  a.scales = wt.s + e * smat;
  a.biases = wt.b ? wt.b + e * smat : nullptr;
  return a;
}

void run_qmm(mx::array& out,
             const mx::array& x,
             const mx::array& w,
             const mx::array& scales,
             const mx::array* biases,
             const QuantSpec& spec) {
  if (out.size() == 0) {
    return;
  }
  const int64_t K = x.shape(-1), N = out.shape(-1);
  const int64_t R = int64_t(x.size()) / std::max<int64_t>(K, 1);
  std::vector<float> xbuf, ybuf;
  float* y = out.dtype() == mx::float32
                 ? out.data<float>()
                 : (ybuf.resize(out.size()), ybuf.data());
  if (K == 0) {
    std::fill(y, y + out.size(), 0.f);
  } else {
    const float* xf = as_float(x, xbuf);
    Weights wt(w, scales, biases);
    const QMatrix a = matrix(wt, w, scales, spec, 0);
    if (spec.transpose) {
      std::vector<quant::Job> jobs(1);
      jobs[0] = {a, xf, R, std::vector<float*>(R)};
      for (int64_t r = 0; r < R; ++r) {
        jobs[0].y[r] = y + r * N;
      }
      quant::matmul_t(jobs);
    } else {
      quant::matmul_n(a, xf, R, y);
    }
  }
  if (out.dtype() != mx::float32) {
    store(y, out);
  }
}

std::vector<int64_t> indices(const mx::array& a) {
  std::vector<uint8_t> buf;
  const uint8_t* p = row_major(a, buf);
  std::vector<int64_t> v(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    if (a.dtype() == mx::uint32) {
      v[i] = reinterpret_cast<const uint32_t*>(p)[i];
    } else if (a.dtype() == mx::int32) {
      v[i] = reinterpret_cast<const int32_t*>(p)[i];
    } else if (a.dtype() == mx::int64) {
      v[i] = reinterpret_cast<const int64_t*>(p)[i];
    } else {
      v[i] = static_cast<int64_t>(reinterpret_cast<const uint64_t*>(p)[i]);
    }
  }
  return v;
}

void run_gather(mx::array& out,
                const mx::array& x,
                const mx::array& w,
                const mx::array& scales,
                const mx::array* biases,
                const mx::array& lhs,
                const mx::array& rhs,
                const QuantSpec& spec) {
  std::vector<float> ybuf;
  float* y = out.dtype() == mx::float32
                 ? out.data<float>()
                 : (ybuf.resize(out.size()), ybuf.data());
  std::fill(y, y + out.size(), 0.f);
  const int64_t M = x.shape(-2), K = x.shape(-1), N = out.shape(-1);
  const int64_t nx = int64_t(x.size()) / std::max<int64_t>(M * K, 1);
  const int64_t E = int64_t(w.size()) /
                    std::max<int64_t>(int64_t(w.shape(-1)) * w.shape(-2), 1);
  if (out.size() == 0 || K == 0) {
    if (out.dtype() != mx::float32) {
      store(y, out);
    }
    return;
  }
  const auto li = indices(lhs), ri = indices(rhs);
  // Pairs grouped by expert: each expert's weights are read once per call.
  std::vector<std::vector<int64_t>> by_expert(E);
  for (size_t i = 0; i < li.size(); ++i) {
    // MLX leaves out-of-range indices undefined; ours give zeros.
    if (li[i] >= 0 && li[i] < nx && ri[i] >= 0 && ri[i] < E) {
      by_expert[ri[i]].push_back(int64_t(i));
    }
  }
  std::vector<float> xbuf;
  const float* xf = as_float(x, xbuf);
  Weights wt(w, scales, biases);
  std::vector<quant::Job> jobs;
  std::vector<std::vector<float>> xs;
  xs.reserve(E);
  for (int64_t e = 0; e < E; ++e) {
    const auto& pairs = by_expert[e];
    if (pairs.empty()) {
      continue;
    }
    const int64_t rows = int64_t(pairs.size()) * M;
    std::vector<float>& xe = xs.emplace_back(rows * K);
    for (size_t p = 0; p < pairs.size(); ++p) {
      std::memcpy(xe.data() + p * M * K,
                  xf + li[pairs[p]] * M * K,
                  M * K * sizeof(float));
    }
    const QMatrix a = matrix(wt, w, scales, spec, e);
    if (spec.transpose) {
      quant::Job job{a, xe.data(), rows, std::vector<float*>(rows)};
      for (size_t p = 0; p < pairs.size(); ++p) {
        for (int64_t m = 0; m < M; ++m) {
          job.y[p * M + m] = y + (pairs[p] * M + m) * N;
        }
      }
      jobs.push_back(std::move(job));
    } else {
      std::vector<float> ye(rows * N);
      quant::matmul_n(a, xe.data(), rows, ye.data());
      for (size_t p = 0; p < pairs.size(); ++p) {
        std::memcpy(
            y + pairs[p] * M * N, ye.data() + p * M * N, M * N * sizeof(float));
      }
    }
  }
  quant::matmul_t(jobs);
  if (out.dtype() != mx::float32) {
    store(y, out);
  }
}

// Our result of the transforms MLX defines on its op, in our inputs' dtypes.
std::vector<mx::array> cast_like(std::vector<mx::array> v,
                                 const std::vector<mx::array>& primals,
                                 const std::vector<int>& argnums) {
  for (size_t j = 0; j < v.size() && j < argnums.size(); ++j) {
    v[j] = mx::astype(v[j], primals[argnums[j]].dtype());
  }
  return v;
}

std::vector<mx::array> cast_tangents(const std::vector<mx::array>& tangents,
                                     const mx::array& ref,
                                     const std::vector<int>& argnums) {
  std::vector<mx::array> t;
  for (size_t j = 0; j < tangents.size(); ++j) {
    t.push_back(mx::astype(tangents[j], ref.inputs()[argnums[j]].dtype()));
  }
  return t;
}

int out_dims(const mx::array& w, const QuantSpec& spec) {
  return spec.transpose ? w.shape(-2) : w.shape(-1) * 32 / spec.bits;
}

// MLX's quantized matmul has no groups of 16 (GGUF's Q2_K, Q3_K, Q6_K), but
// mx::dequantize has: MLX's answer for them is to dequantize and multiply.
constexpr int kSmallGroup = 16;

bool small_group(const std::string& mode, std::optional<int> group_size) {
  return mode == "affine" && group_size == kSmallGroup;
}

mx::array dequant_matmul(const mx::array& x,
                         const mx::array& w,
                         const mx::array& scales,
                         const std::optional<mx::array>& biases,
                         bool transpose,
                         int group_size,
                         int bits,
                         mx::StreamOrDevice s) {
  if (!biases) {
    throw std::invalid_argument(
        "[quantized_matmul] affine weights need biases");
  }
  auto wf = mx::dequantize(w,
                           scales,
                           biases,
                           group_size,
                           bits,
                           "affine",
                           std::nullopt,
                           std::nullopt,
                           s);
  if (transpose) {
    wf = mx::swapaxes(wf, -1, -2, s);
  }
  return mx::astype(mx::matmul(x, wf, s), x.dtype(), s);
}

// The transforms for groups of 16 (MLX's quantized matmul has none to lend):
// with respect to x only, as MLX's own op (the weights are integer codes).
mx::array small_weights(const std::vector<mx::array>& in,
                        const QuantSpec& spec,
                        mx::Stream s) {
  auto wf = mx::dequantize(in[1],
                           in[2],
                           in.size() > 3 ? std::optional<mx::array>(in[3])
                                         : std::nullopt,
                           kSmallGroup,
                           spec.bits,
                           "affine",
                           std::nullopt,
                           in[0].dtype(),
                           s);
  return spec.transpose ? wf : mx::swapaxes(wf, -1, -2, s); // (out, in)
}

void x_only(const std::vector<int>& argnums) {
  for (int a : argnums) {
    if (a != 0) {
      throw std::invalid_argument(
          "[quantized_matmul] derivatives are taken with respect to x only");
    }
  }
}

} // namespace

const uint8_t* row_major(const mx::array& a, std::vector<uint8_t>& buf) {
  if (a.flags().row_contiguous) {
    return a.data<uint8_t>();
  }
  const size_t item = a.itemsize();
  const int nd = a.ndim();
  buf.resize(a.size() * item);
  const uint8_t* src = a.data<uint8_t>();
  std::vector<int64_t> idx(nd, 0);
  int64_t off = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    std::memcpy(buf.data() + i * item, src + off * item, item);
    for (int d = nd - 1; d >= 0; --d) {
      off += a.strides()[d];
      if (++idx[d] < a.shape(d)) {
        break;
      }
      off -= a.strides()[d] * a.shape(d);
      idx[d] = 0;
    }
  }
  return buf.data();
}

bool quant_supported(const std::string& mode, int bits, int group_size) {
  if (mode == "affine") {
    return bits >= 2 && bits <= 8 && bits != 7 &&
           (group_size == 16 || group_size == 32 || group_size == 64 ||
            group_size == 128);
  }
  return mode == "mxfp4" && bits == 4 && group_size == 32;
}

mx::array quantized_matmul(const mx::array& x,
                           const mx::array& w,
                           const mx::array& scales,
                           const std::optional<mx::array>& biases,
                           bool transpose,
                           std::optional<int> group_size,
                           std::optional<int> bits,
                           const std::string& mode,
                           mx::StreamOrDevice s) {
  if (small_group(mode, group_size)) {
    const int nbits = bits.value_or(4);
    auto ref =
        dequant_matmul(x, w, scales, biases, transpose, kSmallGroup, nbits, s);
    if (!ref.has_primitive() ||
        ref.primitive().stream().device != mx::Device::cpu || w.ndim() != 2 ||
        !float_like(x.dtype()) || !scales_ok(mode, scales) ||
        !quant_supported(mode, nbits, kSmallGroup)) {
      return ref;
    }
    return mx::array(ref.shape(),
                     ref.dtype(),
                     std::make_shared<QuantMatmul>(
                         ref.primitive().stream(),
                         QuantSpec{kSmallGroup, nbits, mode, transpose}),
                     {x, w, scales, *biases});
  }
  auto ref = mx::quantized_matmul(
      x, w, scales, biases, transpose, group_size, bits, mode, s);
  if (!is_node(ref, "QuantizedMatmul") ||
      ref.primitive().stream().device != mx::Device::cpu || w.ndim() != 2 ||
      !float_like(x.dtype()) || !scales_ok(mode, scales)) {
    return ref;
  }
  auto [gs, nbits, qmode, tr] =
      static_cast<mx::QuantizedMatmul&>(ref.primitive()).state();
  if (!quant_supported(mode, nbits, gs)) {
    return ref;
  }
  std::vector<mx::array> inputs{x, w, scales};
  if (biases && mode == "affine") {
    inputs.push_back(*biases);
  }
  return mx::array(
      ref.shape(),
      ref.dtype(),
      std::make_shared<QuantMatmul>(ref.primitive().stream(),
                                    QuantSpec{gs, nbits, mode, tr}),
      std::move(inputs));
}

mx::array gather_qmm(const mx::array& x,
                     const mx::array& w,
                     const mx::array& scales,
                     const std::optional<mx::array>& biases,
                     const std::optional<mx::array>& lhs_indices,
                     const std::optional<mx::array>& rhs_indices,
                     bool transpose,
                     std::optional<int> group_size,
                     std::optional<int> bits,
                     const std::string& mode,
                     bool sorted_indices,
                     mx::StreamOrDevice s) {
  if (!lhs_indices && !rhs_indices) {
    return mlx_harmony_core::quantized_matmul(
        x, w, scales, biases, transpose, group_size, bits, mode, s);
  }
  auto ref = mx::gather_qmm(x,
                            w,
                            scales,
                            biases,
                            lhs_indices,
                            rhs_indices,
                            transpose,
                            group_size,
                            bits,
                            mode,
                            std::nullopt,
                            sorted_indices,
                            s);
  if (!is_node(ref, "GatherQMM") ||
      ref.primitive().stream().device != mx::Device::cpu ||
      !float_like(x.dtype()) || !scales_ok(mode, scales)) {
    return ref;
  }
  auto [gs, nbits, qmode, tr, ls, rs] =
      static_cast<mx::GatherQMM&>(ref.primitive()).state();
  if (!quant_supported(mode, nbits, gs)) {
    return ref;
  }
  const auto& ri = ref.inputs();
  std::vector<mx::array> inputs{x, w, scales};
  if (mode == "affine") {
    inputs.push_back(*biases);
  }
  inputs.push_back(ri[ri.size() - 2]);
  inputs.push_back(ri[ri.size() - 1]);
  return mx::array(
      ref.shape(),
      ref.dtype(),
      std::make_shared<GatherQuantMatmul>(ref.primitive().stream(),
                                          QuantSpec{gs, nbits, mode, tr}),
      std::move(inputs));
}

// QuantPrimitive

QuantPrimitive::QuantPrimitive(mx::Stream stream,
                               const char* name,
                               QuantSpec spec,
                               Kernel kernel)
    : CpuPrimitive(stream,
                   name,
                   "",
                   {},
                   [kernel, spec](std::vector<mx::array>& ins,
                                  std::vector<mx::array>& outs) {
                     kernel(outs[0], ins, spec);
                   }),
      spec_(std::move(spec)), kernel_(kernel) {}

std::vector<mx::array>
QuantPrimitive::vjp(const std::vector<mx::array>& primals,
                    const std::vector<mx::array>& cotangents,
                    const std::vector<int>& argnums,
                    const std::vector<mx::array>& outputs) {
  if (spec_.group_size == kSmallGroup) {
    x_only(argnums);
    // y = x @ W^T with W (out, in): dx = dy @ W
    return {mx::matmul(
        cotangents[0], small_weights(primals, spec_, stream()), stream())};
  }
  auto ref = reference(primals);
  return cast_like(
      ref.primitive().vjp(ref.inputs(), cotangents, argnums, outputs),
      primals,
      argnums);
}

std::vector<mx::array>
QuantPrimitive::jvp(const std::vector<mx::array>& primals,
                    const std::vector<mx::array>& tangents,
                    const std::vector<int>& argnums) {
  if (spec_.group_size == kSmallGroup) {
    x_only(argnums);
    auto w = small_weights(primals, spec_, stream());
    return {
        mx::matmul(tangents[0], mx::swapaxes(w, -1, -2, stream()), stream())};
  }
  auto ref = reference(primals);
  return ref.primitive().jvp(
      ref.inputs(), cast_tangents(tangents, ref, argnums), argnums);
}

std::pair<std::vector<mx::array>, std::vector<int>>
QuantPrimitive::vmap(const std::vector<mx::array>& inputs,
                     const std::vector<int>& axes) {
  if (spec_.group_size == kSmallGroup) {
    for (size_t i = 1; i < axes.size(); ++i) {
      if (axes[i] >= 0) {
        throw std::invalid_argument(
            "[quantized_matmul] vmap over the quantized weights is not "
            "supported for groups of 16; vmap over x");
      }
    }
    if (axes[0] < 0) {
      return {{reference(inputs)}, {-1}};
    }
    auto in = inputs;
    // x's mapped axis first, then the product over its rows as usual
    in[0] = mx::moveaxis(inputs[0], axes[0], 0, stream());
    return {{reference(in)}, {0}};
  }
  auto ref = reference(inputs);
  return ref.primitive().vmap(ref.inputs(), axes);
}

bool QuantPrimitive::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const QuantPrimitive*>(&other);
  return o && o->kernel_ == kernel_ && o->spec_ == spec_;
}

// QuantMatmul: inputs x, w, scales[, biases]

namespace {

void run_qmm_inputs(mx::array& out,
                    std::vector<mx::array>& in,
                    const QuantSpec& spec) {
  run_qmm(out, in[0], in[1], in[2], in.size() > 3 ? &in[3] : nullptr, spec);
}

// GatherQuantMatmul: inputs x, w, scales[, biases], lhs, rhs
void run_gather_inputs(mx::array& out,
                       std::vector<mx::array>& in,
                       const QuantSpec& spec) {
  const size_t n = in.size();
  run_gather(out,
             in[0],
             in[1],
             in[2],
             n > 5 ? &in[3] : nullptr,
             in[n - 2],
             in[n - 1],
             spec);
}

} // namespace

QuantMatmul::QuantMatmul(mx::Stream stream, QuantSpec spec)
    : QuantPrimitive(
          stream, "MhcQuantizedMatmul", std::move(spec), run_qmm_inputs) {}

mx::array QuantMatmul::reference(const std::vector<mx::array>& in) {
  if (spec_.group_size == kSmallGroup) {
    return dequant_matmul(in[0],
                          in[1],
                          in[2],
                          in.size() > 3 ? std::optional<mx::array>(in[3])
                                        : std::nullopt,
                          spec_.transpose,
                          kSmallGroup,
                          spec_.bits,
                          stream());
  }
  return mx::quantized_matmul(in[0],
                              in[1],
                              in[2],
                              in.size() > 3 ? std::optional<mx::array>(in[3])
                                            : std::nullopt,
                              spec_.transpose,
                              spec_.group_size,
                              spec_.bits,
                              spec_.mode,
                              stream());
}

std::vector<mx::Shape>
QuantMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = out_dims(inputs[1], spec_);
  return {shape};
}

GatherQuantMatmul::GatherQuantMatmul(mx::Stream stream, QuantSpec spec)
    : QuantPrimitive(
          stream, "MhcGatherQMM", std::move(spec), run_gather_inputs) {}

mx::array GatherQuantMatmul::reference(const std::vector<mx::array>& in) {
  const size_t n = in.size();
  return mx::gather_qmm(in[0],
                        in[1],
                        in[2],
                        n > 5 ? std::optional<mx::array>(in[3]) : std::nullopt,
                        in[n - 2],
                        in[n - 1],
                        spec_.transpose,
                        spec_.group_size,
                        spec_.bits,
                        spec_.mode,
                        std::nullopt,
                        false,
                        stream());
}

std::vector<mx::Shape>
GatherQuantMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs.back().shape();
  shape.push_back(inputs[0].shape(-2));
  shape.push_back(out_dims(inputs[1], spec_));
  return {shape};
}

} // namespace mlx_harmony_core
