"""meanflow: fused JVP kernels and MeanFlow distillation of flow-matching transformers."""
__version__ = "0.1.0"

from meanflow.ops import jvp_attention, jvp_attention_pair  # noqa: E402

__all__ = ["jvp_attention", "jvp_attention_pair", "__version__"]
