#include "quant/kernel.h"

#include <atomic>
#if defined(MHC_HAVE_X86_KERNELS)
#include <cpuid.h>
#endif
#include <cstring>
#include <initializer_list>

namespace mlx_harmony_core::quant {

namespace avx512 {
const Isa* get();
}
namespace avx2 {
const Isa* get();
}
namespace generic {
const Isa* get();
}

const Isa* isa_avx512() {
#if defined(MHC_HAVE_X86_KERNELS)
  return __builtin_cpu_supports("avx512f") ? avx512::get() : nullptr;
#else
  return nullptr;
#endif
}

const Isa* isa_avx2() {
#if defined(MHC_HAVE_X86_KERNELS)
  return cpu_has_avx2() ? avx2::get() : nullptr;
#else
  return nullptr;
#endif
}

const Isa& isa_generic() {
  return *generic::get();
}

namespace {

// Zen 4 (AMD family 19h with AVX-512) runs 512-bit vectors as two 256-bit
// halves: there its AVX-512 kernels measured slower than the AVX2 ones
// (SmolLM2 Q4_K_M decode 110 against 124 tok/s, Q4_1 133 against 136).
bool half_width_avx512() {
#if defined(MHC_HAVE_X86_KERNELS)
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) {
    return false;
  }
  const bool amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;
  if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) {
    return false;
  }
  const unsigned base = (a >> 8) & 0xf, ext = (a >> 20) & 0xff;
  return (base == 0xf ? base + ext : base) == 0x19;
#else
  return false;
#endif
}

} // namespace

std::vector<const Isa*> isas() {
  std::vector<const Isa*> v;
  const Isa *wide = isa_avx512(), *narrow = isa_avx2();
  if (wide && half_width_avx512()) {
    std::swap(wide, narrow);
  }
  for (const Isa* i : {wide, narrow, &isa_generic()}) {
    if (i) {
      v.push_back(i);
    }
  }
  return v;
}

namespace {

const Isa* best() {
  return isas().front();
}

std::atomic<const Isa*> current{nullptr};

} // namespace

const Isa& active() {
  const Isa* i = current.load(std::memory_order_acquire);
  if (!i) {
    i = best();
    current.store(i, std::memory_order_release);
  }
  return *i;
}

bool set_active(const char* name) {
  for (const Isa* i : isas()) {
    if (std::strcmp(i->name, name) == 0) {
      current.store(i, std::memory_order_release);
      return true;
    }
  }
  return false;
}

void deinterleave(const float* x, int64_t n, int chunk, float* out) {
  const int half = chunk / 2;
  for (int64_t c = 0; c < n; c += chunk) {
    for (int j = 0; j < half; ++j) {
      out[c + j] = x[c + 2 * j];
      out[c + half + j] = x[c + 2 * j + 1];
    }
  }
}

} // namespace mlx_harmony_core::quant
