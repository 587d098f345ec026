"""Autograd ops with fused primal + tangent kernels, and their functional API."""
from meanflow.ops.jvp_attention import JVP_ATTENTION, jvp_attention, jvp_attention_pair
from meanflow.ops.pair import PairOp, apply_pair

__all__ = ["JVP_ATTENTION", "PairOp", "apply_pair", "jvp_attention", "jvp_attention_pair"]
from meanflow.ops.jvp_layer_norm_modulate import (JVP_LAYER_NORM_MODULATE, jvp_layer_norm_modulate,
                                                  jvp_layer_norm_modulate_pair)
from meanflow.ops.jvp_rms_norm import JVP_RMS_NORM, jvp_rms_norm, jvp_rms_norm_pair

__all__ += ["JVP_LAYER_NORM_MODULATE", "JVP_RMS_NORM", "jvp_layer_norm_modulate", "jvp_layer_norm_modulate_pair",
            "jvp_rms_norm", "jvp_rms_norm_pair"]
from meanflow.ops.jvp_activation import (JVP_GELU_TANH, JVP_SILU, jvp_gelu_tanh, jvp_gelu_tanh_pair, jvp_silu,
                                         jvp_silu_pair)
from meanflow.ops.jvp_gated_residual import JVP_GATED_RESIDUAL, jvp_gated_residual, jvp_gated_residual_pair
from meanflow.ops.jvp_linear import JVP_LINEAR, jvp_linear, jvp_linear_pair
from meanflow.ops.jvp_rope import JVP_ROPE, jvp_rope, jvp_rope_pair

__all__ += ["JVP_GATED_RESIDUAL", "JVP_GELU_TANH", "JVP_LINEAR", "JVP_ROPE", "JVP_SILU", "jvp_gated_residual",
            "jvp_gated_residual_pair", "jvp_gelu_tanh", "jvp_gelu_tanh_pair", "jvp_linear", "jvp_linear_pair",
            "jvp_rope", "jvp_rope_pair", "jvp_silu", "jvp_silu_pair"]
