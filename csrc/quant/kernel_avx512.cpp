// The quantized kernels for avx512 (16 float lanes).
#define MHC_ISA avx512
#define MHC_ISA_NAME "avx512"
#define MHC_LANES 16
#include "quant/kernel_isa.inc"
