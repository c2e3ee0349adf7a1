"""Fused kernels, each beside its plain torch reference implementation.

One module per op, one public function each, an ``impl`` switch on every function with one
vocabulary ("reference", "fused", "triton", ...; "auto" picks the best implementation available
for the tensors given; MEGATRON_UNIHETERO_KERNELS=reference forces the references; see
_dispatch.py). Importing this package never imports triton, flash_attn, transformer_engine or
apex: they are loaded on first use.
"""

from megatron_unihetero.kernels.attention import attention, segment_ids_to_cu_seqlens
from megatron_unihetero.kernels.cross_entropy import fused_linear_cross_entropy
from megatron_unihetero.kernels.regression import fused_regression_loss
from megatron_unihetero.kernels.rmsnorm import rms_norm
from megatron_unihetero.kernels.rope import apply_rope
from megatron_unihetero.kernels.swiglu import swiglu_linear

__all__ = [
    "apply_rope",
    "attention",
    "fused_linear_cross_entropy",
    "fused_regression_loss",
    "rms_norm",
    "segment_ids_to_cu_seqlens",
    "swiglu_linear",
]
