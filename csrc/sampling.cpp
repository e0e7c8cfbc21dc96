#include "sampling.h"

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/random.h"
#include "mlx/types/half_types.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

namespace mlx_harmony_core {

namespace {

inline uint64_t mix64(uint64_t z) {
  // splitmix64's finalizer: a bijection with full avalanche.
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// exp(x) for x <= 0 with ~2 ulp error, branch-free so the loops vectorize.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Converts one row to float32 in `dst` and reports max and validity.
template <typename T>
void load_row(const T *src, float *dst, int64_t n, float &max_out, bool &bad) {
  float m = -std::numeric_limits<float>::infinity();
  bool nonfinite = false;
  for (int64_t i = 0; i < n; ++i) {
    float v = static_cast<float>(src[i]);
    dst[i] = v;
    m = v > m ? v : m;
    nonfinite |= (v != v) | (v == std::numeric_limits<float>::infinity());
  }
  max_out = m;
  bad = nonfinite;
}

int32_t argmax_row(const float *x, int64_t n) {
  int64_t best = 0;
  float bv = x[0];
  for (int64_t i = 1; i < n; ++i) {
    if (x[i] > bv) {
      bv = x[i];
      best = i;
    }
  }
  return static_cast<int32_t>(best);
}

// Inverse-CDF draw from softmax(x / T) over the whole row.
int32_t draw_row(
    const float *x, float *w, int64_t n, float max, float inv_t, double u) {
  double z = 0.0;
  float zf = 0.0f;
  constexpr int64_t kBlock = 1024; // float partial sums, double across blocks
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    zf = 0.0f;
    for (int64_t i = b; i < e; ++i) {
      const float p = fast_exp((x[i] - max) * inv_t);
      w[i] = p;
      zf += p;
    }
    z += zf;
  }
  const double target = u * z;
  double acc = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] > 0.0f) {
      acc += w[i];
      last = i;
      if (acc > target) {
        return static_cast<int32_t>(i);
      }
    }
  }
  // Rounding can leave target just above the final sum: take the last
  // token that has any mass.
  return static_cast<int32_t>(last);
}

template <typename T>
void sample_rows(const T *logits,
                 int32_t *out,
                 int64_t rows,
                 int64_t vocab,
                 SamplingOptions opt) {
  std::vector<float> x(vocab), w(vocab);
  for (int64_t r = 0; r < rows; ++r) {
    float max;
    bool bad;
    load_row(logits + r * vocab, x.data(), vocab, max, bad);
    if (bad) {
      out[r] = kErrorNonFinite;
      continue;
    }
    if (max == -std::numeric_limits<float>::infinity()) {
      out[r] = kErrorNoCandidate;
      continue;
    }
    if (opt.temperature == 0.0f) {
      out[r] = argmax_row(x.data(), vocab);
      continue;
    }
    const double u = uniform01(opt.seed, opt.counter, r, 0);
    out[r] =
        draw_row(x.data(), w.data(), vocab, max, 1.0f / opt.temperature, u);
  }
}

} // namespace

double uniform01(uint64_t seed, uint64_t counter, uint64_t row, uint64_t lane) {
  uint64_t h = mix64(seed + 0x9e3779b97f4a7c15ULL);
  h = mix64(h ^ (counter * 0xd1b54a32d192ed03ULL + 0x632be59bd9b4e019ULL));
  h = mix64(h ^
            (row * 0x8cb92ba72f3d8dd7ULL + lane * 0x9e3779b97f4a7c15ULL + 1));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

mx::array sample(const mx::array &logits,
                 const SamplingOptions &options,
                 mx::StreamOrDevice s) {
  if (logits.ndim() != 1 && logits.ndim() != 2) {
    throw std::invalid_argument("logits must have shape (V,) or (B, V); got " +
                                std::to_string(logits.ndim()) + " dimensions");
  }
  const auto dt = logits.dtype();
  if (dt != mx::float32 && dt != mx::float16 && dt != mx::bfloat16) {
    throw std::invalid_argument(
        "logits must be float32, float16 or bfloat16; cast them with "
        ".astype(mx.float32)");
  }
  if (logits.shape(-1) == 0) {
    throw std::invalid_argument("logits have an empty vocabulary axis (V = 0)");
  }
  if (!(options.temperature >= 0.0f) || std::isinf(options.temperature)) {
    throw std::invalid_argument("temperature must be a finite number >= 0");
  }
  auto stream = mx::to_stream(s);
  const bool batched = logits.ndim() == 2;
  auto rows =
      batched ? logits : mx::reshape(logits, {1, logits.shape(0)}, stream);

  mx::array out(mx::Shape{0}, mx::int32, nullptr, {});
  if (stream.device == mx::Device::cpu) {
    rows = mx::contiguous(rows, false, stream);
    out = mx::array(mx::Shape{rows.shape(0)},
                    mx::int32,
                    std::make_shared<Sample>(stream, options),
                    {rows});
  } else {
    // GPU: the same distribution from MLX ops (no full sort).
    auto x = mx::astype(rows, mx::float32, stream);
    if (options.temperature == 0.0f) {
      out = mx::astype(mx::argmax(x, -1, false, stream), mx::int32, stream);
    } else {
      auto key = mx::random::key(mix64(options.seed ^ mix64(options.counter)));
      out = mx::astype(
          mx::random::categorical(
              mx::multiply(x, mx::array(1.0f / options.temperature), stream),
              -1,
              key,
              stream),
          mx::int32,
          stream);
    }
  }
  return batched ? out : mx::reshape(out, {}, stream);
}

void Sample::eval_cpu(const std::vector<mx::array> &inputs, mx::array &out) {
  const auto &logits = inputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto &encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(logits);
  encoder.set_output_array(out);
  const int64_t rows = logits.shape(0);
  const int64_t vocab = logits.shape(1);
  encoder.dispatch([logits = mx::array::unsafe_weak_copy(logits),
                    out = mx::array::unsafe_weak_copy(out),
                    rows,
                    vocab,
                    opt = options_]() mutable {
    int32_t *dst = out.data<int32_t>();
    switch (logits.dtype()) {
    case mx::float32:
      sample_rows(logits.data<float>(), dst, rows, vocab, opt);
      break;
    case mx::float16:
      sample_rows(logits.data<mx::float16_t>(), dst, rows, vocab, opt);
      break;
    case mx::bfloat16:
      sample_rows(logits.data<mx::bfloat16_t>(), dst, rows, vocab, opt);
      break;
    default:
      for (int64_t r = 0; r < rows; ++r) {
        dst[r] = kErrorNonFinite;
      }
    }
  });
}

void Sample::eval_gpu(const std::vector<mx::array> &, mx::array &) {
  throw std::runtime_error(
      "MhcSample runs on the CPU; on a GPU stream sample() builds MLX ops");
}

bool Sample::is_equivalent(const mx::Primitive &other) const {
  const auto &o = static_cast<const Sample &>(other);
  return o.options_.temperature == options_.temperature &&
         o.options_.seed == options_.seed &&
         o.options_.counter == options_.counter;
}

std::vector<mx::Shape>
Sample::output_shapes(const std::vector<mx::array> &inputs) {
  return {mx::Shape{inputs[0].shape(0)}};
}

} // namespace mlx_harmony_core
