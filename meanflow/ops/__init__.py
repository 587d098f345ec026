"""Autograd ops with fused primal + tangent kernels, and their functional API."""
from meanflow.ops.jvp_attention import JVPAttentionFunction, jvp_attention, jvp_attention_pair

__all__ = ["JVPAttentionFunction", "jvp_attention", "jvp_attention_pair"]
