// The quantized kernels for generic (8 float lanes).
#define MHC_ISA generic
#define MHC_ISA_NAME "generic"
#define MHC_LANES 8
#include "quant/kernel_isa.inc"
