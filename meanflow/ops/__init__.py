"""Autograd ops with fused primal + tangent kernels, and their functional API."""
from meanflow.ops.jvp_attention import JVP_ATTENTION, jvp_attention, jvp_attention_pair
from meanflow.ops.pair import PairOp, apply_pair

__all__ = ["JVP_ATTENTION", "PairOp", "apply_pair", "jvp_attention", "jvp_attention_pair"]
from meanflow.ops.jvp_layer_norm_modulate import (JVP_LAYER_NORM_MODULATE, jvp_layer_norm_modulate,
                                                  jvp_layer_norm_modulate_pair)
from meanflow.ops.jvp_rms_norm import JVP_RMS_NORM, jvp_rms_norm, jvp_rms_norm_pair

__all__ += ["JVP_LAYER_NORM_MODULATE", "JVP_RMS_NORM", "jvp_layer_norm_modulate", "jvp_layer_norm_modulate_pair",
            "jvp_rms_norm", "jvp_rms_norm_pair"]
