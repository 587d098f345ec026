"""Autograd ops with fused primal + tangent kernels, and their functional API.

Every op comes in two forms: ``jvp_<op>(...)``, a drop-in for the plain torch function that
also works under ``torch.func.jvp`` and forward-AD dual tensors, and ``jvp_<op>_pair(...)``,
which takes and returns (primal, tangent) pairs for the pair-mode forward of a network. The
tangent never carries autograd history. ``JVP_<OP>`` is the op's ``PairOp`` description.
"""
from meanflow.ops.jvp_activation import (JVP_GELU_TANH, JVP_SILU, jvp_gelu_tanh, jvp_gelu_tanh_pair, jvp_silu,
                                         jvp_silu_pair)
from meanflow.ops.jvp_attention import (JVP_ATTENTION, JVP_ATTENTION_VARLEN, JVPAttentionMode, jvp_attention,
                                        jvp_attention_pair, jvp_attention_varlen, jvp_attention_varlen_pair)
from meanflow.ops.jvp_gated_residual import JVP_GATED_RESIDUAL, jvp_gated_residual, jvp_gated_residual_pair
from meanflow.ops.jvp_layer_norm_modulate import (JVP_LAYER_NORM_MODULATE, jvp_layer_norm_modulate,
                                                  jvp_layer_norm_modulate_pair)
from meanflow.ops.jvp_linear import JVP_LINEAR, jvp_linear, jvp_linear_pair
from meanflow.ops.jvp_rms_norm import JVP_RMS_NORM, jvp_rms_norm, jvp_rms_norm_pair
from meanflow.ops.jvp_rope import JVP_ROPE, jvp_rope, jvp_rope_pair
from meanflow.ops.pair import PairOp, apply_pair

__all__ = [
    "PairOp", "apply_pair",
    "JVP_ATTENTION", "JVPAttentionMode", "jvp_attention", "jvp_attention_pair",
    "JVP_ATTENTION_VARLEN", "jvp_attention_varlen", "jvp_attention_varlen_pair",
    "JVP_GATED_RESIDUAL", "jvp_gated_residual", "jvp_gated_residual_pair",
    "JVP_GELU_TANH", "jvp_gelu_tanh", "jvp_gelu_tanh_pair",
    "JVP_LAYER_NORM_MODULATE", "jvp_layer_norm_modulate", "jvp_layer_norm_modulate_pair",
    "JVP_LINEAR", "jvp_linear", "jvp_linear_pair",
    "JVP_RMS_NORM", "jvp_rms_norm", "jvp_rms_norm_pair",
    "JVP_ROPE", "jvp_rope", "jvp_rope_pair",
    "JVP_SILU", "jvp_silu", "jvp_silu_pair",
]
from meanflow.ops.adaptive_weighted_loss import AdaptiveWeightedLoss, adaptive_weighted_loss
from meanflow.ops.alignment_loss import AlignmentLoss, alignment_direction, alignment_loss

__all__ += ["AdaptiveWeightedLoss", "AlignmentLoss", "adaptive_weighted_loss", "alignment_direction",
            "alignment_loss"]
