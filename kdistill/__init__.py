"""kdistill: knowledge distillation of language models."""

from kdistill.onednn import bound_onednn_caches

bound_onednn_caches()  # before torch's first bf16 GEMM in this process (see kdistill.onednn)

__version__ = "0.1.0"
