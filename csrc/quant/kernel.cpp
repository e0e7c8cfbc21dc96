#include "quant/kernel.h"

#include <atomic>
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

const Isa* best() {
  if (const Isa* i = isa_avx512()) {
    return i;
  }
  if (const Isa* i = isa_avx2()) {
    return i;
  }
  return &isa_generic();
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
  for (const Isa* i : {isa_avx512(), isa_avx2(), &isa_generic()}) {
    if (i && std::strcmp(i->name, name) == 0) {
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
