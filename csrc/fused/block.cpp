#include "fused/block.h"

#include "fused/common.h"
#include "fused/fused.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "primitive/cpu_primitive.h"
#include "quant/matmul.h"
#include "quant/pool.h"
#include "quant/quant.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>

namespace mlx_harmony_core::fused {

namespace {

using namespace detail;

// Where a QLinear's arrays sit in a primitive's inputs, and its quantization.
struct LinSpec {
  int at = 0; // index of w; scales, [biases], [bias] follow
  int group = 32, bits = 4;
  std::string mode;
  bool has_biases = false, has_bias = false;
  int zero = 0; // QLinear::zero
  int64_t rows = 0, cols = 0;
};

LinSpec push_linear(std::vector<mx::array>& inputs, const QLinear& l) {
  LinSpec sp;
  sp.at = int(inputs.size());
  sp.group = l.group_size;
  sp.bits = l.bits;
  sp.mode = l.mode;
  sp.has_biases = l.biases.has_value();
  sp.has_bias = l.bias.has_value();
  sp.zero = l.zero;
  sp.rows = l.w.ndim() == 2 ? l.w.shape(0) : 0;
  sp.cols = l.w.ndim() == 2 ? int64_t(l.w.shape(1)) * 32 / l.bits : 0;
  inputs.push_back(l.w);
  inputs.push_back(l.scales);
  if (l.biases) {
    inputs.push_back(*l.biases);
  }
  if (l.bias) {
    inputs.push_back(*l.bias);
  }
  return sp;
}

std::string spec_key(const LinSpec& l) {
  std::ostringstream s;
  s << l.group << ',' << l.bits << ',' << l.mode << ',' << l.has_biases << ','
    << l.has_bias << ',' << l.zero << ',' << l.rows << ',' << l.cols << ';';
  return s.str();
}

// What our kernels and this fused path take of a linear fed `cols` inputs.
bool linear_ok(const QLinear& l, int64_t cols, mx::Dtype t) {
  if (l.w.ndim() != 2 || l.w.dtype() != mx::uint32 || l.scales.ndim() != 2 ||
      l.bits <= 0 || !quant_supported(l.mode, l.bits, l.group_size)) {
    return false;
  }
  const bool mxfp4 = l.mode == "mxfp4";
  if (mxfp4 ? l.scales.dtype() != mx::uint8 || l.biases.has_value()
            : !float_like(l.scales.dtype()) || !l.biases ||
                  l.biases->dtype() != l.scales.dtype()) {
    return false;
  }
  if (int64_t(l.w.shape(1)) * 32 / l.bits != cols ||
      l.scales.shape(0) != l.w.shape(0) ||
      int64_t(l.scales.shape(1)) * l.group_size != cols) {
    return false;
  }
  return !l.bias || (l.bias->dtype() == t && l.bias->ndim() == 1 &&
                     l.bias->shape(0) == l.w.shape(0));
}

// The linear of spec `l` in `in`, as MLX-level ops (the reference path).
mx::array ref_linear(const mx::array& x,
                     const std::vector<mx::array>& in,
                     const LinSpec& l,
                     mx::Stream s) {
  int k = l.at + 2;
  std::optional<mx::array> biases;
  if (l.has_biases) {
    biases = in[k++];
  }
  auto y = mlx_harmony_core::quantized_matmul(
      x, in[l.at], in[l.at + 1], biases, true, l.group, l.bits, l.mode, s);
  return l.has_bias ? mx::add(y, in[k], s) : y;
}

// ---- evaluation
// ---------------------------------------------------------------

// One linear's matrix and bias for the kernels, from the evaluated inputs.
struct Lin {
  quant::QMatrix a;
  std::vector<float> bias; // empty: none
  std::vector<uint8_t> wb, sb, bb;

  Lin(const std::vector<mx::array>& in, const LinSpec& l) {
    const mx::array& w = in[l.at];
    const mx::array& sc = in[l.at + 1];
    int k = l.at + 2;
    const bool wide = l.group >= 32;
    a.format = l.mode == "mxfp4"     ? quant::Format::Mxfp4
               : l.bits == 8 && wide ? quant::Format::Affine8
               : l.bits == 4 && wide ? quant::Format::Affine4
                                     : quant::Format::AffineN;
    a.bits = l.bits;
    a.group = l.group;
    a.scale_type = sc.dtype() == mx::float16    ? quant::ScaleType::F16
                   : sc.dtype() == mx::bfloat16 ? quant::ScaleType::BF16
                   : sc.dtype() == mx::uint8    ? quant::ScaleType::E8M0
                                                : quant::ScaleType::F32;
    a.rows = l.rows;
    a.cols = l.cols;
    a.w = row_major(w, wb);
    a.scales = row_major(sc, sb);
    if (l.has_biases && l.zero) {
      a.zero = l.zero; // the kernels derive the biases from the scales
      ++k;
    } else if (l.has_biases) {
      a.biases = row_major(in[k++], bb);
    }
    if (l.has_bias) {
      bias.resize(l.rows);
      const mx::array& b = in[k];
      const float* p = load(b, 0, b.strides()[0], l.rows, bias.data());
      if (p != bias.data()) {
        std::memcpy(bias.data(), p, l.rows * sizeof(float));
      }
    }
  }
};

// Weight bytes of a step's GEMVs from which they are split over the pool's
// threads (each thread a share of every matrix's rows): below it waking a
// worker costs more than it saves.
constexpr int64_t kSplitBytes = 96 << 10;

int64_t scale_bytes(quant::ScaleType t) {
  return t == quant::ScaleType::F32 ? 4 : t == quant::ScaleType::E8M0 ? 1 : 2;
}

// Rows [r0, r1) of a as a matrix of their own.
quant::QMatrix rows_of(const quant::QMatrix& a, int64_t r0, int64_t r1) {
  quant::QMatrix b = a;
  const int64_t sb = a.groups() * scale_bytes(a.scale_type);
  b.rows = r1 - r0;
  b.w = a.w + r0 * a.row_bytes();
  b.scales = static_cast<const uint8_t*>(a.scales) + r0 * sb;
  if (a.biases) {
    b.biases = static_cast<const uint8_t*>(a.biases) + r0 * sb;
  }
  return b;
}

// y_j (R x rows_j) = x (R x cols) @ a_j^T + bias_j, rounded as MLX stores
// each op's result in t. The GEMVs run in one pass: every thread of the pool
// takes its share of each matrix's rows (matmul_t on it runs them alone).
void linears(std::vector<Lin*> lins,
             const float* x,
             int64_t R,
             std::vector<std::vector<float>*> ys,
             mx::Dtype t) {
  int64_t bytes = 0;
  for (size_t j = 0; j < lins.size(); ++j) {
    ys[j]->assign(R * lins[j]->a.rows, 0.f);
    bytes += lins[j]->a.rows * lins[j]->a.row_bytes();
  }
  auto& pool = quant::Pool::instance();
  const int threads = std::max(1, pool.threads());
  // One part a thread. Several a thread (claimed as threads come free, for a
  // thread the OS preempts) measured slower in the engine on 2 cores: SmolLM2
  // decode 109 tok/s against 105 with two a thread and 99-105 with four (each
  // part is a matmul_t call of its own; fewer, longer weight streams).
  int64_t parts = threads > 1 && bytes >= kSplitBytes ? threads : 1;
  // matmul_t threads big passes (and the BLAS route for many rows) itself;
  // split here only where it would run a share on its calling thread alone.
  if (R >= quant::gemm_rows() ||
      bytes * R / threads >= quant::parallel_bytes()) {
    parts = 1;
  }
  // x prepared once per layout for every part (each part's matmul_t would
  // prepare it again for each matrix: ~1 ms of a SmolLM2 token at 8 parts).
  std::vector<quant::Prepared> ready(lins.size());
  std::vector<const quant::Prepared*> uses(lins.size());
  if (parts > 1) {
    for (size_t j = 0; j < lins.size(); ++j) {
      size_t same = 0;
      while (same < j && !quant::same_layout(lins[same]->a, lins[j]->a)) {
        ++same;
      }
      if (same == j) {
        quant::prepare({lins[j]->a, x, R, {}}, ready[j]);
      }
      uses[j] = same == j ? &ready[j] : uses[same];
    }
  }
  auto part = [&](int64_t p) {
    std::vector<quant::Job> jobs;
    for (size_t j = 0; j < lins.size(); ++j) {
      const quant::QMatrix& a = lins[j]->a;
      // Shares in whole blocks of 16 rows, as the kernels' row tiles.
      const int64_t blocks = (a.rows + 15) / 16;
      const int64_t r0 = std::min(a.rows, blocks * p / parts * 16);
      const int64_t r1 = std::min(a.rows, blocks * (p + 1) / parts * 16);
      if (r1 <= r0) {
        continue;
      }
      quant::Job job{rows_of(a, r0, r1), x, R, std::vector<float*>(R), uses[j]};
      for (int64_t r = 0; r < R; ++r) {
        job.y[r] = ys[j]->data() + r * a.rows + r0;
      }
      jobs.push_back(std::move(job));
    }
    quant::matmul_t(jobs);
  };
  if (parts > 1) {
    pool.run(parts, part);
  } else {
    part(0);
  }
  for (size_t j = 0; j < lins.size(); ++j) {
    const int64_t N = lins[j]->a.rows;
    std::vector<float>& y = *ys[j];
    const std::vector<float>& b = lins[j]->bias;
    for (int64_t r = 0; r < R; ++r) {
      float* yr = y.data() + r * N;
      if (b.empty()) {
        if (t != mx::float32) {
          for (int64_t n = 0; n < N; ++n) {
            yr[n] = round_to(yr[n], t);
          }
        }
      } else {
        for (int64_t n = 0; n < N; ++n) {
          yr[n] = round_to(round_to(yr[n], t) + b[n], t);
        }
      }
    }
  }
}

// out (R x D) = RMSNorm(rows) * w, rounded like MLX's op (x * n in t first).
void rms_rows(const float* x,
              int64_t R,
              int64_t D,
              const float* w,
              float eps,
              mx::Dtype t,
              float* out) {
  for (int64_t r = 0; r < R; ++r) {
    const float* row = x + r * D;
    const float n = 1.f / std::sqrt(sum_squares(row, D) / float(D) + eps);
    for (int64_t i = 0; i < D; ++i) {
      out[r * D + i] = round_to(round_to(row[i] * n, t) * w[i], t);
    }
  }
}

struct InSpec {
  float eps;
  int heads, kv_heads;
  int dims;
  bool traditional;
  float base;
  float scale;
  bool has_freqs;
  LinSpec q, k, v;
  int offset_at;
};

void run_attn_in(std::vector<mx::array>& in,
                 std::vector<mx::array>& outs,
                 const InSpec& sp) {
  const mx::array& x = in[0];
  const mx::Dtype t = outs[0].dtype();
  const int64_t B = x.shape(0), L = x.shape(1), D = x.shape(2), R = B * L;
  std::vector<float> xf(R * D), wbuf(D), xn(R * D);
  for (int64_t r = 0; r < R; ++r) {
    const float* p =
        load(x, row_offset(x, r), x.strides().back(), D, xf.data() + r * D);
    if (p != xf.data() + r * D) {
      std::memcpy(xf.data() + r * D, p, D * sizeof(float));
    }
  }
  const float* w = load(in[1], 0, in[1].strides()[0], D, wbuf.data());
  rms_rows(xf.data(), R, D, w, sp.eps, t, xn.data());

  Lin lq(in, sp.q), lk(in, sp.k), lv(in, sp.v);
  std::vector<float> yq, yk, yv;
  linears({&lq, &lk, &lv}, xn.data(), R, {&yq, &yk, &yv}, t);

  // RoPE's inverse frequencies, as MLX's op computes them.
  const int64_t hd = sp.q.rows / sp.heads, hdv = sp.v.rows / sp.kv_heads;
  const int half = sp.dims / 2;
  std::vector<float> inv(half);
  if (sp.has_freqs) {
    const mx::array& f = in[sp.offset_at + 1];
    std::vector<float> fbuf(half);
    const float* fp =
        load(f, 0, f.strides().empty() ? 1 : f.strides()[0], half, fbuf.data());
    for (int i = 0; i < half; ++i) {
      inv[i] = 1.f / fp[i];
    }
  } else {
    const float step = std::log(sp.base) / half;
    for (int i = 0; i < half; ++i) {
      inv[i] = std::exp(float(-i) * step);
    }
  }
  const mx::array& offset = in[sp.offset_at];
  std::vector<int64_t> offs(offset.size());
  for (size_t i = 0; i < offset.size(); ++i) {
    offs[i] =
        offset.data<int32_t>()[offset.ndim() ? i * offset.strides()[0] : 0];
  }
  std::vector<float> c(half), s(half), y(std::max(hd, hdv));
  auto rope_heads = [&](const std::vector<float>& src,
                        int heads,
                        mx::array& out,
                        int64_t b,
                        int64_t l) {
    const int64_t N = heads * hd;
    for (int h = 0; h < heads; ++h) {
      const float* row = src.data() + (b * L + l) * N + h * hd;
      rotate(row, c.data(), s.data(), half, hd, sp.traditional, y.data());
      store(y.data(), out, ((b * heads + h) * L + l) * hd, hd);
    }
  };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      const float pos =
          (float(l) + float(offs.size() > 1 ? offs[b] : offs[0])) * sp.scale;
      for (int i = 0; i < half; ++i) {
        const float theta = pos * inv[i];
        c[i] = round_to(std::cos(theta), t);
        s[i] = round_to(std::sin(theta), t);
      }
      rope_heads(yq, sp.heads, outs[0], b, l);
      rope_heads(yk, sp.kv_heads, outs[1], b, l);
      for (int h = 0; h < sp.kv_heads; ++h) {
        store(yv.data() + (b * L + l) * sp.v.rows + h * hdv,
              outs[2],
              ((b * sp.kv_heads + h) * L + l) * hdv,
              hdv);
      }
    }
  }
}

struct OutSpec {
  float eps;
  LinSpec o, gate, up, down;
  int norm_at;
};

void run_attn_out_mlp(std::vector<mx::array>& in,
                      mx::array& out,
                      const OutSpec& sp) {
  const mx::array& attn = in[0];
  const mx::array& x = in[1];
  const mx::Dtype t = out.dtype();
  const int64_t B = x.shape(0), L = x.shape(1), D = x.shape(2), R = B * L;
  const int64_t H = attn.shape(1), hd = attn.shape(3), Din = H * hd;
  const auto& as = attn.strides();
  std::vector<float> a(R * Din), buf(hd);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t h = 0; h < H; ++h) {
        const float* p = load(
            attn, b * as[0] + h * as[1] + l * as[2], as[3], hd, buf.data());
        std::memcpy(
            a.data() + (b * L + l) * Din + h * hd, p, hd * sizeof(float));
      }
    }
  }
  Lin lo(in, sp.o);
  std::vector<float> yo;
  linears({&lo}, a.data(), R, {&yo}, t);
  // h = x + o(attn), in t.
  std::vector<float> h(R * D), xb(D), hn(R * D), wbuf(D);
  for (int64_t r = 0; r < R; ++r) {
    const float* xr =
        load(x, row_offset(x, r), x.strides().back(), D, xb.data());
    for (int64_t i = 0; i < D; ++i) {
      h[r * D + i] = round_to(xr[i] + yo[r * D + i], t);
    }
  }
  const mx::array& nw = in[sp.norm_at];
  const float* w = load(nw, 0, nw.strides()[0], D, wbuf.data());
  rms_rows(h.data(), R, D, w, sp.eps, t, hn.data());
  Lin lg(in, sp.gate), lu(in, sp.up);
  std::vector<float> g, u;
  linears({&lg, &lu}, hn.data(), R, {&g, &u}, t);
  std::vector<float> e(g.size());
  swiglu_rows(g.data(), u.data(), int64_t(g.size()), t, e.data(), g.data());
  Lin ld(in, sp.down);
  std::vector<float> d;
  linears({&ld}, g.data(), R, {&d}, t);
  for (int64_t i = 0; i < R * D; ++i) {
    h[i] += d[i];
  }
  store(h.data(), out, 0, R * D);
}

// ---- references (MLX-level ops: a GPU stream, transforms, what we skip) ----

std::vector<mx::array>
ref_attn_in(const std::vector<mx::array>& in, const InSpec& sp, mx::Stream s) {
  const mx::array& x = in[0];
  const int B = x.shape(0), L = x.shape(1);
  auto xn = rms_norm(x, in[1], sp.eps, s);
  auto heads = [&](const mx::array& y, int n) {
    return mx::transpose(mx::reshape(y, {B, L, n, -1}, s), {0, 2, 1, 3}, s);
  };
  auto q = heads(ref_linear(xn, in, sp.q, s), sp.heads);
  auto k = heads(ref_linear(xn, in, sp.k, s), sp.kv_heads);
  auto v = heads(ref_linear(xn, in, sp.v, s), sp.kv_heads);
  const mx::array& off = in[sp.offset_at];
  std::optional<mx::array> freqs;
  std::optional<float> base;
  if (sp.has_freqs) {
    freqs = in[sp.offset_at + 1];
  } else {
    base = sp.base;
  }
  q = rope(q, sp.dims, sp.traditional, base, sp.scale, off, freqs, s);
  k = rope(k, sp.dims, sp.traditional, base, sp.scale, off, freqs, s);
  return {q, k, v};
}

mx::array ref_attn_out_mlp(const std::vector<mx::array>& in,
                           const OutSpec& sp,
                           mx::Stream s) {
  const mx::array &attn = in[0], &x = in[1];
  const int B = x.shape(0), L = x.shape(1);
  auto a = mx::reshape(mx::transpose(attn, {0, 2, 1, 3}, s), {B, L, -1}, s);
  auto h = mx::add(x, ref_linear(a, in, sp.o, s), s);
  auto n = rms_norm(h, in[sp.norm_at], sp.eps, s);
  auto g = ref_linear(n, in, sp.gate, s);
  auto u = ref_linear(n, in, sp.up, s);
  auto act = mx::multiply(mx::multiply(g, mx::sigmoid(g, s), s), u, s);
  return mx::add(h, ref_linear(act, in, sp.down, s), s);
}

std::string lin_keys(std::initializer_list<const LinSpec*> ls) {
  std::string k;
  for (auto* l : ls) {
    k += spec_key(*l);
  }
  return k;
}

} // namespace

namespace {

// Element i of an evaluated row-contiguous float array, as float32.
float float_at(const mx::array& a, size_t i) {
  if (a.dtype() == mx::float16) {
    return float(a.data<mx::float16_t>()[i]);
  }
  if (a.dtype() == mx::bfloat16) {
    return float(a.data<mx::bfloat16_t>()[i]);
  }
  return a.data<float>()[i];
}

} // namespace

QLinear with_zero(QLinear l) {
  l.zero = 0;
  if (!l.biases || l.mode != "affine") {
    return l;
  }
  const mx::array& s = l.scales;
  const mx::array& b = *l.biases;
  if (!float_like(s.dtype()) || s.dtype() != b.dtype() ||
      s.size() != b.size() || s.size() == 0 || !s.is_available() ||
      !b.is_available() || !s.flags().row_contiguous ||
      !b.flags().row_contiguous) {
    return l;
  }
  // The zero point the first nonzero scale implies, then every group's.
  int zero = 0;
  for (size_t i = 0; i < s.size() && !zero; ++i) {
    const float si = float_at(s, i);
    if (si != 0.f && std::isfinite(si)) {
      for (int z : {4, 8, 16, 32, 128}) {
        zero = float_at(b, i) == -float(z) * si ? z : zero;
      }
      if (!zero) {
        return l;
      }
    }
  }
  for (size_t i = 0; i < s.size(); ++i) {
    if (!(float_at(b, i) == -float(zero) * float_at(s, i))) {
      return l;
    }
  }
  l.zero = zero;
  return l;
}

// ---- ops
// ------------------------------------------------------------------------

namespace {

// attn_in's primitive inputs, spec and whether the fused path takes them.
struct InPlan {
  std::vector<mx::array> inputs; // x, norm_w, q/k/v, offset, [freqs]
  InSpec sp;
  bool fits;
  int64_t hd;
  int hdv;
};

InPlan plan_attn_in(const mx::array& x,
                    const mx::array& norm_w,
                    float eps,
                    const std::vector<QLinear>& qkv,
                    int n_heads,
                    int n_kv_heads,
                    const RopeArgs& rp,
                    const mx::array& offset,
                    mx::Stream s) {
  if (qkv.size() != 3) {
    throw std::invalid_argument("[attn_in] qkv takes three linears: q, k, v");
  }
  if (n_heads <= 0 || n_kv_heads <= 0) {
    throw std::invalid_argument("[attn_in] head counts must be positive");
  }
  InPlan p{{x, norm_w},
           InSpec{eps,
                  n_heads,
                  n_kv_heads,
                  rp.dims,
                  rp.traditional,
                  rp.base.value_or(0.f),
                  rp.scale,
                  rp.freqs.has_value(),
                  {},
                  {},
                  {},
                  0},
           false,
           0,
           0};
  InSpec& sp = p.sp;
  std::vector<mx::array>& inputs = p.inputs;
  sp.q = push_linear(inputs, qkv[0]);
  sp.k = push_linear(inputs, qkv[1]);
  sp.v = push_linear(inputs, qkv[2]);
  sp.offset_at = int(inputs.size());
  inputs.push_back(
      offset.dtype() == mx::int32 ? offset : mx::astype(offset, mx::int32, s));
  if (rp.freqs) {
    inputs.push_back(*rp.freqs);
  }
  const mx::Dtype t = x.dtype();
  const int64_t D = x.ndim() == 3 ? x.shape(2) : 0;
  const int64_t hd = sp.q.rows / n_heads;
  p.hd = hd;
  p.hdv = int(sp.v.rows / n_kv_heads);
  p.fits = on_cpu(s) && x.ndim() == 3 && x.size() > 0 &&
           x.shape(1) <= kMaxBlockRows && float_like(t) && norm_w.ndim() == 1 &&
           norm_w.shape(0) == D &&
           mx::promote_types(x.dtype(), norm_w.dtype()) == t &&
           linear_ok(qkv[0], D, t) && linear_ok(qkv[1], D, t) &&
           linear_ok(qkv[2], D, t) && sp.q.rows % n_heads == 0 &&
           sp.k.rows == n_kv_heads * hd && sp.v.rows % n_kv_heads == 0 &&
           n_heads % n_kv_heads == 0 && rp.dims > 0 && rp.dims % 2 == 0 &&
           rp.dims <= hd && (rp.freqs || rp.base) &&
           (!rp.freqs || (float_like(rp.freqs->dtype()) &&
                          rp.freqs->size() == size_t(rp.dims / 2))) &&
           mx::issubdtype(offset.dtype(), mx::integer) &&
           (offset.ndim() == 0 ||
            (offset.ndim() == 1 &&
             (offset.shape(0) == x.shape(0) || offset.shape(0) == 1)));
  return p;
}

// attn_out_mlp's primitive inputs (attn's slot first) and spec.
struct OutPlan {
  std::vector<mx::array> inputs; // attn, x, o, norm_w, gate, up, down
  OutSpec sp;
};

OutPlan plan_attn_out(const mx::array& attn,
                      const mx::array& x,
                      const QLinear& o,
                      const mx::array& norm_w,
                      float eps,
                      const QLinear& gate,
                      const QLinear& up,
                      const QLinear& down) {
  OutPlan p{{attn, x}, OutSpec{eps, {}, {}, {}, {}, 0}};
  p.sp.o = push_linear(p.inputs, o);
  p.sp.norm_at = int(p.inputs.size());
  p.inputs.push_back(norm_w);
  p.sp.gate = push_linear(p.inputs, gate);
  p.sp.up = push_linear(p.inputs, up);
  p.sp.down = push_linear(p.inputs, down);
  return p;
}

// Whether the fused path takes attn_out_mlp on an attention output of
// `heads` x `hd` (its dtype x's) and these arguments.
bool out_fits(int64_t heads,
              int64_t hd,
              const mx::array& x,
              const QLinear& o,
              const mx::array& norm_w,
              const QLinear& gate,
              const QLinear& up,
              const QLinear& down,
              const OutSpec& sp,
              mx::Stream s) {
  const mx::Dtype t = x.dtype();
  const int64_t D = x.ndim() == 3 ? x.shape(2) : 0;
  return on_cpu(s) && x.ndim() == 3 && x.size() > 0 &&
         x.shape(1) <= kMaxBlockRows && float_like(t) && norm_w.ndim() == 1 &&
         norm_w.shape(0) == D &&
         mx::promote_types(x.dtype(), norm_w.dtype()) == t &&
         linear_ok(o, heads * hd, t) && sp.o.rows == D &&
         linear_ok(gate, D, t) && linear_ok(up, D, t) &&
         sp.gate.rows == sp.up.rows && linear_ok(down, sp.gate.rows, t) &&
         sp.down.rows == D;
}

// An evaluated (allocated, row-contiguous) array for a step's intermediate.
mx::array fresh(const mx::Shape& shape, mx::Dtype t) {
  mx::array a(shape, t, nullptr, {});
  a.set_data(mx::allocator::malloc(a.nbytes()));
  return a;
}

// Rows [lo, hi) of buf (B, H, cap, hd), row-contiguous, as an array of its
// own sharing buf's data.
mx::array rows_view(const mx::array& buf, int lo, int hi) {
  mx::Shape shape = buf.shape();
  shape[2] = hi - lo;
  mx::array v(shape, buf.dtype(), nullptr, {});
  const bool whole = lo == 0 && hi == buf.shape(2);
  v.copy_shared_buffer(buf,
                       buf.strides(),
                       {whole, whole, false},
                       buf.data_size(),
                       int64_t(lo) * buf.strides()[2]);
  return v;
}

// Copies rows [0, n) of each (batch, head) of src (any strides) into the
// row-contiguous dst of the same batch, heads and head_dim.
void copy_rows(const mx::array& src, mx::array& dst, int n) {
  const int64_t B = src.shape(0), H = src.shape(1), hd = src.shape(3);
  const int64_t cap = dst.shape(2);
  const auto& st = src.strides();
  std::vector<float> buf(hd);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t r = 0; r < n; ++r) {
        const float* p =
            load(src, b * st[0] + h * st[1] + r * st[2], st[3], hd, buf.data());
        store(p, dst, ((b * H + h) * cap + r) * hd, hd);
      }
    }
  }
}

// Writes rows (B, H, L, hd) (row-contiguous) into buf (B, H, cap, hd)
// (row-contiguous, same dtype) at row `at`.
void write_rows(const mx::array& rows, mx::array& buf, int at) {
  const int64_t B = rows.shape(0), H = rows.shape(1), L = rows.shape(2);
  const int64_t cap = buf.shape(2);
  const int64_t n = L * rows.shape(3) * rows.itemsize();
  const auto* src = rows.data<uint8_t>();
  auto* dst = buf.data<uint8_t>();
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::memcpy(dst + (bh * cap + at) * rows.shape(3) * rows.itemsize(),
                src + bh * n,
                n);
  }
}

// Key/value buffers stack steps copied because MLX could not donate them.
std::atomic<int64_t> g_stack_copies{0};

// One layer of a stack step: where its arguments sit in the inputs.
struct StackLayer {
  InSpec in;
  OutSpec out;
  int in_at, in_n;   // attn_in's inputs after x
  int out_at, out_n; // attn_out_mlp's inputs after (attn, x)
  int heads, kv_heads, hd, hdv;
  float scale;
  // The layer's attn_in / attn_out_mlp arguments when all are evaluated
  // (weights): kept here, not as the primitive's inputs (empty: inputs).
  std::vector<mx::array> a_fixed, o_fixed;
};

// Where a stack step writes and what its queries attend.
struct StackAt {
  int at, lo;  // buffer column of the new rows; first column attended
  bool causal; // mask mode "causal"
  int mask_at; // input index of the (B, heads, L, K) mask; -1: none
  int off_at;  // input index of the positions (int32)
  int kv_at;   // input index of layer 0's key buffer (then its values, ...)
};

void run_stack(std::vector<mx::array>& in,
               std::vector<mx::array>& outs,
               const std::vector<StackLayer>& layers,
               const StackAt& where) {
  const int offset = where.at;
  const mx::Dtype t = outs[0].dtype();
  mx::array x = in[0];
  const int B = x.shape(0), L = x.shape(1);
  for (size_t i = 0; i < layers.size(); ++i) {
    const StackLayer& ly = layers[i];
    mx::array& kb = outs[1 + 2 * i];
    mx::array& vb = outs[2 + 2 * i];
    // A buffer MLX could not donate: this step's copy keeps the rows before.
    const mx::array& k_in = in[where.kv_at + 2 * i];
    const mx::array& v_in = in[where.kv_at + 2 * i + 1];
    if (kb.data<uint8_t>() != k_in.data<uint8_t>()) {
      copy_rows(k_in, kb, offset);
      g_stack_copies.fetch_add(offset > 0, std::memory_order_relaxed);
    }
    if (vb.data<uint8_t>() != v_in.data<uint8_t>()) {
      copy_rows(v_in, vb, offset);
      g_stack_copies.fetch_add(offset > 0, std::memory_order_relaxed);
    }
    std::vector<mx::array> ain{x};
    if (ly.a_fixed.empty()) {
      ain.insert(
          ain.end(), in.begin() + ly.in_at, in.begin() + ly.in_at + ly.in_n);
    } else {
      ain.insert(ain.end(), ly.a_fixed.begin(), ly.a_fixed.end());
      ain[ly.in.offset_at] = in[where.off_at]; // this step's, not the plan's
    }
    std::vector<mx::array> qkv{fresh({B, ly.heads, L, ly.hd}, t),
                               fresh({B, ly.kv_heads, L, ly.hd}, t),
                               fresh({B, ly.kv_heads, L, ly.hdv}, t)};
    run_attn_in(ain, qkv, ly.in);
    write_rows(qkv[1], kb, offset);
    write_rows(qkv[2], vb, offset);
    std::vector<mx::array> sin{qkv[0],
                               rows_view(kb, where.lo, offset + L),
                               rows_view(vb, where.lo, offset + L)};
    if (where.mask_at >= 0) {
      sin.push_back(in[where.mask_at]);
    }
    mx::array attn = fresh({B, ly.heads, L, ly.hdv}, t);
    attend(sin, attn, ly.scale, where.causal, where.mask_at >= 0);
    std::vector<mx::array> oin{attn, x};
    if (ly.o_fixed.empty()) {
      oin.insert(
          oin.end(), in.begin() + ly.out_at, in.begin() + ly.out_at + ly.out_n);
    } else {
      oin.insert(oin.end(), ly.o_fixed.begin(), ly.o_fixed.end());
    }
    mx::array next = i + 1 == layers.size() ? outs[0] : fresh(x.shape(), t);
    run_attn_out_mlp(oin, next, ly.out);
    x = next;
  }
}

} // namespace

std::vector<mx::array> attn_in(const mx::array& x,
                               const mx::array& norm_w,
                               float eps,
                               const std::vector<QLinear>& qkv,
                               int n_heads,
                               int n_kv_heads,
                               const RopeArgs& rp,
                               const mx::array& offset,
                               mx::StreamOrDevice s_) {
  const mx::Stream s = mx::to_stream(s_);
  InPlan p =
      plan_attn_in(x, norm_w, eps, qkv, n_heads, n_kv_heads, rp, offset, s);
  const InSpec& sp = p.sp;
  if (!p.fits) {
    return ref_attn_in(p.inputs, sp, s);
  }
  const mx::Dtype t = x.dtype();
  const int B = x.shape(0), L = x.shape(1);
  std::ostringstream key;
  key.precision(9);
  key << eps << ',' << n_heads << ',' << n_kv_heads << ',' << rp.dims << ','
      << rp.traditional << ',' << sp.base << ',' << rp.scale << ','
      << sp.has_freqs << ';' << lin_keys({&sp.q, &sp.k, &sp.v});
  auto fallback = [sp, s](std::vector<mx::array> in) {
    return ref_attn_in(in, sp, s);
  };
  return mx::array::make_arrays(
      {{B, n_heads, L, int(p.hd)},
       {B, n_kv_heads, L, int(p.hd)},
       {B, n_kv_heads, L, p.hdv}},
      {t, t, t},
      std::make_shared<CpuPrimitive>(
          s,
          "FusedAttnIn",
          key.str(),
          fallback,
          [sp](std::vector<mx::array>& in, std::vector<mx::array>& outs) {
            run_attn_in(in, outs, sp);
          }),
      p.inputs);
}

mx::array attn_out_mlp(const mx::array& attn,
                       const mx::array& x,
                       const QLinear& o,
                       const mx::array& norm_w,
                       float eps,
                       const QLinear& gate,
                       const QLinear& up,
                       const QLinear& down,
                       mx::StreamOrDevice s_) {
  const mx::Stream s = mx::to_stream(s_);
  OutPlan p = plan_attn_out(attn, x, o, norm_w, eps, gate, up, down);
  const OutSpec& sp = p.sp;
  const bool fits =
      attn.ndim() == 4 && attn.dtype() == x.dtype() && x.ndim() == 3 &&
      attn.shape(0) == x.shape(0) && attn.shape(2) == x.shape(1) &&
      out_fits(
          attn.shape(1), attn.shape(3), x, o, norm_w, gate, up, down, sp, s);
  if (!fits) {
    return ref_attn_out_mlp(p.inputs, sp, s);
  }
  std::ostringstream key;
  key.precision(9);
  key << eps << ';' << lin_keys({&sp.o, &sp.gate, &sp.up, &sp.down});
  auto fallback = [sp, s](std::vector<mx::array> in) {
    return std::vector<mx::array>{ref_attn_out_mlp(in, sp, s)};
  };
  return mx::array::make_arrays(
      {x.shape()},
      {x.dtype()},
      std::make_shared<CpuPrimitive>(
          s,
          "FusedAttnOutMLP",
          key.str(),
          fallback,
          [sp](std::vector<mx::array>& in, std::vector<mx::array>& outs) {
            run_attn_out_mlp(in, outs[0], sp);
          }),
      p.inputs)[0];
}

uint64_t next_layer_id() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

int64_t stack_copies() {
  return g_stack_copies.load(std::memory_order_relaxed);
}

namespace {

// Every layer's StackLayer for x (its shape and dtype) on s, checked as
// attn_in and attn_out_mlp check theirs; arguments not evaluated (lazy
// weights) go to `inputs` instead (in_at / out_at). Nothing where a layer
// does not take the fused path.
std::optional<std::vector<StackLayer>>
plan_layers(const std::vector<const Layer*>& layers,
            const mx::array& x,
            const mx::array& off,
            mx::Stream s,
            std::vector<mx::array>& inputs) {
  std::vector<StackLayer> specs;
  specs.reserve(layers.size());
  for (const Layer* lp : layers) {
    const Layer& ly = *lp;
    InPlan a = plan_attn_in(
        x, ly.norm1, ly.eps1, ly.qkv, ly.heads, ly.kv_heads, ly.rope, off, s);
    OutPlan o =
        plan_attn_out(x, x, ly.o, ly.norm2, ly.eps2, ly.gate, ly.up, ly.down);
    if (!a.fits || !out_fits(ly.heads,
                             a.hdv,
                             x,
                             ly.o,
                             ly.norm2,
                             ly.gate,
                             ly.up,
                             ly.down,
                             o.sp,
                             s)) {
      return std::nullopt;
    }
    StackLayer sl{a.sp,
                  o.sp,
                  0,
                  int(a.inputs.size()) - 1,
                  0,
                  int(o.inputs.size()) - 2,
                  ly.heads,
                  ly.kv_heads,
                  int(a.hd),
                  a.hdv,
                  ly.scale,
                  {},
                  {}};
    // Every output of a multi-output primitive keeps its own copy of the
    // inputs: ~20 arrays a layer for 2 * layers + 1 outputs made building
    // the step cost ~2 ms. Evaluated arguments (the weights) need no graph
    // edge: the step keeps them itself (the positions, the step's own, are
    // an input: run_stack puts them in their slot).
    auto available = [](auto first, auto last) {
      return std::all_of(
          first, last, [](const mx::array& a) { return a.is_available(); });
    };
    const auto off_slot = a.inputs.begin() + a.sp.offset_at;
    if (available(a.inputs.begin() + 1, off_slot) &&
        available(off_slot + 1, a.inputs.end()) &&
        available(o.inputs.begin() + 2, o.inputs.end())) {
      sl.a_fixed.assign(a.inputs.begin() + 1, a.inputs.end());
      sl.o_fixed.assign(o.inputs.begin() + 2, o.inputs.end());
    } else {
      sl.in_at = int(inputs.size());
      inputs.insert(inputs.end(), a.inputs.begin() + 1, a.inputs.end());
      sl.out_at = int(inputs.size());
      inputs.insert(inputs.end(), o.inputs.begin() + 2, o.inputs.end());
    }
    specs.push_back(std::move(sl));
  }
  return specs;
}

} // namespace

// A stack's plan whose arguments were all evaluated, and what it was for;
// kept by the stack's first layer.
struct StackMemo {
  std::vector<uint64_t> ids;
  mx::Shape shape;
  mx::Dtype t;
  mx::Stream s;
  std::shared_ptr<const std::vector<StackLayer>> specs;
};

namespace {

std::mutex g_memo_mutex;

std::vector<uint64_t> ids_of(const std::vector<const Layer*>& layers) {
  std::vector<uint64_t> ids(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    ids[i] = layers[i]->id;
  }
  return ids;
}

std::shared_ptr<const std::vector<StackLayer>> memo_plan(
    const std::vector<const Layer*>& layers, const mx::array& x, mx::Stream s) {
  std::lock_guard<std::mutex> lock(g_memo_mutex);
  const StackMemo* m = layers[0]->memo.get();
  if (m && m->shape == x.shape() && m->t == x.dtype() && m->s == s &&
      m->ids == ids_of(layers)) {
    return m->specs;
  }
  return nullptr;
}

// Plans the layers (memoized where every argument is evaluated).
std::shared_ptr<const std::vector<StackLayer>>
plan_stack(const std::vector<const Layer*>& layers,
           const mx::array& x,
           const mx::array& off,
           mx::Stream s,
           std::vector<mx::array>& inputs) {
  const size_t before = inputs.size();
  auto specs = plan_layers(layers, x, off, s, inputs);
  if (!specs) {
    return nullptr;
  }
  auto shared =
      std::make_shared<const std::vector<StackLayer>>(std::move(*specs));
  if (inputs.size() == before) {
    auto memo = std::make_shared<StackMemo>(
        StackMemo{ids_of(layers), x.shape(), x.dtype(), s, shared});
    std::lock_guard<std::mutex> lock(g_memo_mutex);
    layers[0]->memo = std::move(memo);
  }
  return shared;
}

} // namespace

std::optional<std::vector<mx::array>>
stack_step(const std::vector<const Layer*>& layers,
           const mx::array& x,
           const mx::array& positions,
           const std::vector<std::pair<mx::array, mx::array>>& bufs,
           int at,
           int lo,
           const std::string& mask_mode,
           const std::optional<mx::array>& mask,
           bool views_below,
           mx::StreamOrDevice s_) {
  const mx::Stream s = mx::to_stream(s_);
  if (layers.empty() || bufs.size() != layers.size() || at < 0 || lo < 0 ||
      lo > at || x.ndim() != 3 || (mask_mode == "array") != mask.has_value() ||
      (!mask_mode.empty() && mask_mode != "causal" && mask_mode != "array")) {
    return std::nullopt;
  }
  const int offset = at;
  const int B = x.shape(0), L = x.shape(1);
  const mx::Dtype t = x.dtype();
  const int K = at + L - lo;
  if (mask && (mask->ndim() > 4 || mask->shape(-1) != K ||
               (mask->dtype() != mx::bool_ && !float_like(mask->dtype())))) {
    return std::nullopt;
  }
  const mx::array off = positions.dtype() == mx::int32
                            ? positions
                            : mx::astype(positions, mx::int32, s);
  std::vector<mx::array> inputs{x, off};
  // The layers' plans: memoized while every weight is evaluated (a decode
  // loop's steps: planning 30 layers was ~0.15 ms of building each token).
  std::shared_ptr<const std::vector<StackLayer>> specs =
      memo_plan(layers, x, s);
  if (!specs) {
    auto plan = plan_stack(layers, x, off, s, inputs);
    if (!plan) {
      return std::nullopt;
    }
    specs = std::move(plan);
  }
  const int kv_at = int(inputs.size());
  std::vector<std::pair<int, int>> donations;
  for (size_t i = 0; i < layers.size(); ++i) {
    const StackLayer& sl = (*specs)[i];
    const auto& [kb, vb] = bufs[i];
    if (kb.ndim() != 4 || vb.ndim() != 4 || kb.dtype() != t ||
        vb.dtype() != t || kb.shape(0) != B || kb.shape(1) != sl.kv_heads ||
        kb.shape(3) != sl.hd || vb.shape(0) != B ||
        vb.shape(1) != sl.kv_heads || vb.shape(3) != sl.hdv ||
        kb.shape(2) < offset + L || vb.shape(2) < offset + L) {
      return std::nullopt;
    }
    donations.emplace_back(int(1 + 2 * i), int(inputs.size()));
    inputs.push_back(kb);
    donations.emplace_back(int(2 + 2 * i), int(inputs.size()));
    inputs.push_back(vb);
  }
  StackAt where{at, lo, mask_mode == "causal", -1, 1, kv_at};
  if (mask) {
    // One (B, heads, L, K) view for every layer (the heads of the first).
    const int heads = layers[0]->heads;
    for (const Layer* ly : layers) {
      if (ly->heads != heads) {
        return std::nullopt;
      }
    }
    auto m = mask->dtype() == mx::bool_ ? *mask : mx::astype(*mask, t, s);
    where.mask_at = int(inputs.size());
    inputs.push_back(mx::broadcast_to(m, {B, heads, L, K}, s));
  }
  std::vector<mx::Shape> shapes{x.shape()};
  std::vector<mx::Dtype> types{t};
  for (const auto& [kb, vb] : bufs) {
    shapes.push_back(kb.shape());
    shapes.push_back(vb.shape());
    types.push_back(t);
    types.push_back(t);
  }
  // Inference only (no fallback graph: no transforms); an empty key, so MLX
  // never merges two steps.
  auto prim = std::make_shared<CpuPrimitive>(
      s,
      "FusedStackStep",
      std::string(),
      CpuPrimitive::Fallback(),
      [specs = std::move(specs), where](std::vector<mx::array>& in,
                                        std::vector<mx::array>& outs) {
        run_stack(in, outs, *specs, where);
      });
  for (auto [out, in] : donations) {
    prim->donate(out, in, views_below);
  }
  return mx::array::make_arrays(shapes, types, prim, inputs);
}

} // namespace mlx_harmony_core::fused
