// The quantized kernels for avx2 (8 float lanes).
#define MHC_ISA avx2
#define MHC_ISA_NAME "avx2"
#define MHC_LANES 8
#include "quant/kernel_isa.inc"
