#include "quant/repack.h"

#include "mlx/allocator.h"
#include "quant/gguf_blocks.h"
#include "quant/gguf_blocks_common.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <thread>
#include <unistd.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mlx_harmony_core::quant {

namespace {

constexpr int kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kBF16 = 30,
              kMXFP4 = 39;
// Bytes of blocks read per step: a thread's buffer stays in its L2 cache.
constexpr int64_t kStepBytes = 256 << 10;
// Float tensors go straight from the file to the array, this much per pread.
constexpr int64_t kFloatStep = 8 << 20;

using gguf::half_to_float; // exact half -> float, shared with the block kernels
using gguf::load_u16;

// float -> half rounding to nearest even, as numpy's npy_floatbits_to_halfbits
// (so biases equal the reference's .astype(np.float16) bit for bit).
uint16_t float_to_half(float value) {
  uint32_t f;
  std::memcpy(&f, &value, 4);
  uint16_t sign = uint16_t((f & 0x80000000u) >> 16);
  uint32_t f_exp = f & 0x7f800000u;
  uint32_t f_sig;
  if (f_exp >= 0x47800000u) { // overflow, inf or NaN
    if (f_exp == 0x7f800000u && (f & 0x007fffffu)) {
      uint16_t ret = uint16_t(0x7c00u + ((f & 0x007fffffu) >> 13));
      return uint16_t(sign + (ret == 0x7c00u ? ret + 1 : ret));
    }
    return uint16_t(sign + 0x7c00u);
  }
  if (f_exp <= 0x38000000u) { // a half subnormal or zero
    if (f_exp < 0x33000000u) {
      return sign;
    }
    f_exp >>= 23;
    f_sig = 0x00800000u + (f & 0x007fffffu);
    f_sig >>= (113 - f_exp);
    if ((f_sig & 0x00003fffu) != 0x00001000u || (f & 0x000007ffu)) {
      f_sig += 0x00001000u;
    }
    return uint16_t(sign + (f_sig >> 13));
  }
  uint16_t h_exp = uint16_t((f_exp - 0x38000000u) >> 13);
  f_sig = f & 0x007fffffu;
  if ((f_sig & 0x00003fffu) != 0x00001000u) {
    f_sig += 0x00001000u;
  }
  uint16_t h_sig = uint16_t(f_sig >> 13);
  return uint16_t(sign + h_sig + h_exp); // a carry into the exponent is right
}

// ggml's 16-byte 4-bit block (element j in the low nibble of byte j, j+16 in
// its high one) to MLX's packing (elements 2k, 2k+1 in byte k).
inline void repack_nibbles(const uint8_t* src, uint8_t* dst) {
#if defined(__SSE2__)
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m128i low4 = _mm_set1_epi8(0x0f);
  const __m128i low8 = _mm_set1_epi16(0x00ff);
  __m128i lo = _mm_and_si128(x, low4);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), low4);
  // In each 16-bit lane (bytes 2m, 2m+1): the low byte becomes a | b << 4.
  lo = _mm_and_si128(_mm_or_si128(lo, _mm_srli_epi16(lo, 4)), low8);
  hi = _mm_and_si128(_mm_or_si128(hi, _mm_srli_epi16(hi, 4)), low8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(lo, hi));
#else
  for (int k = 0; k < 8; ++k) {
    dst[k] = uint8_t((src[2 * k] & 0x0f) | (src[2 * k + 1] << 4));
    dst[k + 8] = uint8_t((src[2 * k] >> 4) | (src[2 * k + 1] & 0xf0));
  }
#endif
}

// Reads exactly n bytes at offset (pread returns less near signals or limits).
void read_exact(int fd, uint8_t* dst, int64_t n, int64_t offset) {
  while (n > 0) {
    ssize_t got = ::pread(fd, dst, size_t(n), off_t(offset));
    if (got < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw std::runtime_error("reading the GGUF file at byte " +
                               std::to_string(offset) +
                               " failed: " + std::strerror(errno));
    }
    if (got == 0) {
      throw std::runtime_error("the GGUF file ends at byte " +
                               std::to_string(offset) +
                               " inside a tensor (is it truncated?)");
    }
    dst += got;
    n -= got;
    offset += got;
  }
}

// Fresh memory faulted in 2 MiB pages where the kernel allows it: fewer faults
// and TLB misses, but the kernel may compact memory to find them.
void advise_huge(void* ptr, size_t nbytes) {
#if defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t(2) << 20;
  uintptr_t a = (reinterpret_cast<uintptr_t>(ptr) + huge - 1) & ~(huge - 1);
  uintptr_t b = (reinterpret_cast<uintptr_t>(ptr) + nbytes) & ~(huge - 1);
  if (b > a) {
    ::madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE); // a hint
  }
#endif
}

struct Out {
  mx::array array;
  uint8_t* data;
  bool zeroed = false; // fresh arena memory (MLX's allocator reuses buffers)
};

Out new_array(const mx::Shape& shape,
              mx::Dtype dtype,
              bool huge_pages,
              const std::shared_ptr<WeightArena>& arena) {
  size_t n = size_t(dtype.size());
  for (auto d : shape) {
    n *= size_t(d);
  }
  uint8_t* mine =
      arena && gguf::mapped_arrays_zero_copy() ? arena->take(n) : nullptr;
  if (mine) {
    // As MLX's CPU allocator lays a buffer out: its size in a header before
    // the data.
    std::memcpy(mine - sizeof(size_t), &n, sizeof(size_t));
    return {gguf::foreign_array(mine, shape, dtype, arena), mine, true};
  }
  auto data = mx::allocator::malloc(n);
  auto buffer = data.buffer();
  auto* ptr = static_cast<uint8_t*>(buffer.raw_ptr());
  if (n && !ptr) {
    throw std::runtime_error("cannot allocate " + std::to_string(n) +
                             " bytes for a tensor");
  }
  if (huge_pages) {
    advise_huge(ptr, n);
  }
  return {mx::array(std::move(data), shape, dtype), ptr};
}

// Runs fn(begin, end) over [0, n) split into `threads` contiguous parts.
template <typename F>
void parallel(int64_t n, int threads, F fn) {
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  if (threads == 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::exception_ptr> errors(threads);
  std::vector<std::thread> pool;
  auto part = [&](int t) {
    try {
      fn(n * t / threads, n * (t + 1) / threads);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  for (int t = 1; t < threads; ++t) {
    pool.emplace_back(part, t);
  }
  part(0);
  for (auto& th : pool) {
    th.join();
  }
  for (auto& e : errors) {
    if (e) {
      std::rethrow_exception(e);
    }
  }
}

// Block layout in the file: bytes per block of 32 weights.
int block_bytes(int type) {
  switch (type) {
  case kQ4_0:
    return 18;
  case kQ4_1:
    return 20;
  case kQ8_0:
    return 34;
  case kMXFP4:
    return 17;
  }
  return 0;
}

// Converts blocks [b0, b1) held in `src` (block b0 first) into the outputs.
void convert_blocks(int type,
                    const uint8_t* src,
                    int64_t b0,
                    int64_t b1,
                    uint8_t* codes,
                    uint8_t* scales,
                    uint8_t* biases) {
  const int bs = block_bytes(type);
  for (int64_t b = b0; b < b1; ++b, src += bs) {
    switch (type) {
    case kMXFP4:
      scales[b] = src[0];
      repack_nibbles(src + 1, codes + b * 16);
      break;
    case kQ4_0: {
      uint16_t d = load_u16(src);
      std::memcpy(scales + 2 * b, &d, 2);
      uint16_t bias = float_to_half(half_to_float(d) * -8.0f);
      std::memcpy(biases + 2 * b, &bias, 2);
      repack_nibbles(src + 2, codes + b * 16);
      break;
    }
    case kQ4_1:
      std::memcpy(scales + 2 * b, src, 2);
      std::memcpy(biases + 2 * b, src + 2, 2);
      repack_nibbles(src + 4, codes + b * 16);
      break;
    case kQ8_0: {
      uint16_t d = load_u16(src);
      std::memcpy(scales + 2 * b, &d, 2);
      uint16_t bias = float_to_half(half_to_float(d) * -128.0f);
      std::memcpy(biases + 2 * b, &bias, 2);
      // MLX's 8-bit codes are unsigned: q + 128, i.e. the sign bit flipped.
      uint64_t q[4];
      std::memcpy(q, src + 2, 32);
      for (auto& v : q) {
        v ^= 0x8080808080808080ull;
      }
      std::memcpy(codes + b * 32, q, 32);
      break;
    }
    }
  }
}

} // namespace

WeightArena::WeightArena(size_t capacity, bool huge_pages) {
  constexpr size_t huge = size_t(2) << 20;
  size_ = (capacity + huge - 1) / huge * huge;
  if (size_ == 0) {
    return;
  }
  // One extra huge page of slack so that the block can start on a 2 MiB
  // boundary whatever address the kernel picks.
  void* p = ::mmap(nullptr,
                   size_ + huge,
                   PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS,
                   -1,
                   0);
  if (p == MAP_FAILED) {
    throw std::runtime_error(
        "cannot map " + std::to_string(size_) +
        " bytes for the model's weights: " + std::strerror(errno));
  }
  auto* raw = static_cast<uint8_t*>(p);
  auto* aligned = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(raw) + huge - 1) & ~uintptr_t(huge - 1));
  if (aligned > raw) {
    ::munmap(raw, size_t(aligned - raw));
  }
  const size_t tail = size_t(raw + size_ + huge - (aligned + size_));
  if (tail) {
    ::munmap(aligned + size_, tail);
  }
  base_ = aligned;
  if (huge_pages) {
    advise_huge(base_, size_);
  }
}

WeightArena::~WeightArena() {
  if (base_) {
    ::munmap(base_, size_);
  }
}

uint8_t* WeightArena::take(size_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  // 64-byte aligned data with the header slot in the padding before it.
  const size_t at = (used_ + sizeof(size_t) + 63) / 64 * 64;
  if (!base_ || at + nbytes > size_) {
    return nullptr;
  }
  used_ = at + nbytes;
  return base_ + at;
}

size_t WeightArena::used() {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}

mx::array new_weight_array(const mx::Shape& shape,
                           mx::Dtype dtype,
                           bool huge_pages,
                           const std::shared_ptr<WeightArena>& arena) {
  Out out = new_array(shape, dtype, huge_pages, arena);
  if (!out.zeroed) {
    std::memset(out.data, 0, out.array.nbytes());
  }
  return out.array;
}

bool gguf_type_supported(int type) {
  switch (type) {
  case kF32:
  case kF16:
  case kBF16:
  case kQ4_0:
  case kQ4_1:
  case kQ8_0:
  case kMXFP4:
    return true;
  }
  return false;
}

std::vector<mx::array>
load_gguf_tensor(int fd,
                 int64_t offset,
                 int type,
                 const std::vector<int64_t>& shape,
                 int threads,
                 bool huge_pages,
                 const std::shared_ptr<WeightArena>& arena) {
  if (!gguf_type_supported(type)) {
    throw std::invalid_argument("GGML type " + std::to_string(type) +
                                " is not one load_gguf_tensor converts");
  }
  if (threads < 1) {
    throw std::invalid_argument("threads must be >= 1");
  }
  if (offset < 0) {
    throw std::invalid_argument("offset must be >= 0");
  }
  mx::Shape mshape;
  int64_t count = 1;
  for (auto d : shape) {
    if (d < 0 || d > INT32_MAX) {
      throw std::invalid_argument("tensor dimension " + std::to_string(d) +
                                  " is out of range");
    }
    mshape.push_back(mx::ShapeElem(d));
    count *= d;
  }
  if (type == kF32 || type == kF16 || type == kBF16) {
    mx::Dtype dtype = type == kF32
                          ? mx::float32
                          : (type == kF16 ? mx::float16 : mx::bfloat16);
    Out out = new_array(mshape, dtype, huge_pages, arena);
    const int64_t nbytes = count * int64_t(dtype.size());
    parallel((nbytes + kFloatStep - 1) / kFloatStep,
             threads,
             [&](int64_t s0, int64_t s1) {
               for (int64_t s = s0; s < s1; ++s) {
                 int64_t a = s * kFloatStep;
                 int64_t n = std::min(kFloatStep, nbytes - a);
                 read_exact(fd, out.data + a, n, offset + a);
               }
             });
    return {out.array};
  }
  if (shape.empty() || shape.back() % 32) {
    throw std::invalid_argument(
        "a quantized tensor's last dimension must be whole blocks of 32");
  }
  const int bits = type == kQ8_0 ? 8 : 4;
  const int64_t blocks = count / 32;
  mx::Shape code_shape = mshape;
  code_shape.back() = mx::ShapeElem(shape.back() * bits / 32);
  mx::Shape scale_shape = mshape;
  scale_shape.back() = mx::ShapeElem(shape.back() / 32);
  Out codes = new_array(code_shape, mx::uint32, huge_pages, arena);
  Out scales = new_array(
      scale_shape, type == kMXFP4 ? mx::uint8 : mx::float16, huge_pages, arena);
  std::vector<mx::array> result{codes.array, scales.array};
  uint8_t* biases = nullptr;
  if (type != kMXFP4) {
    Out b = new_array(scale_shape, mx::float16, huge_pages, arena);
    biases = b.data;
    result.push_back(b.array);
  }
  const int bs = block_bytes(type);
  const int64_t step = std::max<int64_t>(1, kStepBytes / bs);
  parallel(blocks, threads, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> buf(size_t(std::min(step, b1 - b0) * bs));
    for (int64_t b = b0; b < b1; b += step) {
      int64_t e = std::min(b1, b + step);
      read_exact(fd, buf.data(), (e - b) * bs, offset + b * bs);
      convert_blocks(type, buf.data(), b, e, codes.data, scales.data, biases);
    }
  });
  return result;
}

} // namespace mlx_harmony_core::quant
