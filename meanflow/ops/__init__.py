"""Autograd ops with fused primal + tangent kernels, and their functional API."""
from meanflow.ops.jvp_attention import JVP_ATTENTION, jvp_attention, jvp_attention_pair
from meanflow.ops.pair import PairOp, apply_pair

__all__ = ["JVP_ATTENTION", "PairOp", "apply_pair", "jvp_attention", "jvp_attention_pair"]
