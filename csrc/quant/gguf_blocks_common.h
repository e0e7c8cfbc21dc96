// Tables and scalar decoding shared by every ISA's block kernels
// (gguf_blocks.h has the layouts).
#pragma once

#include <cstdint>
#include <cstring>

namespace mlx_harmony_core::gguf {

// llama.cpp's kvalues_mxfp4: e2m1 values doubled, so the scale is 2^(e-128).
alignas(16) inline constexpr int8_t kMxfp4Values[16] = {
    0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// 2^(e-128) as llama.cpp's GGML_E8M0_TO_FP32_HALF (e = 0, 1: subnormal).
inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? (0x00200000u << e) : uint32_t(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// IEEE half to float, exact (subnormals, inf, nan).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else { // subnormal: normalize
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400));
    bits = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// One block's 32 values without its scale, and the scale.
inline float decode_block(int type, const uint8_t* p, float* v) {
  if (type == 8) {
    for (int j = 0; j < 32; ++j) {
      v[j] = float(int8_t(p[2 + j]));
    }
    return half_to_float(load_u16(p));
  }
  for (int j = 0; j < 16; ++j) {
    v[j] = kMxfp4Values[p[1 + j] & 0x0f];
    v[j + 16] = kMxfp4Values[p[1 + j] >> 4];
  }
  return e8m0_half(p[0]);
}

} // namespace mlx_harmony_core::gguf
