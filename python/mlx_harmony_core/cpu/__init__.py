"""MLX on the CPU: the OpenBLAS shim (:mod:`.blas`, loaded before ``mlx.core``), our quantized
kernels behind MLX's quantized layers (:mod:`.quant`), expert-by-expert MoE layers
(:mod:`.experts`), fused RMSNorm / RoPE / attention primitives (:mod:`.fused`), and switching
a loaded model's layers to them (:mod:`.layers`).

Nothing is imported here: :mod:`.blas` must load before ``mlx.core``, the rest after it.
"""
