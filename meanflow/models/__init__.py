"""Adapters from real model classes (diffusers' FluxTransformer2DModel first) to MeanFlow.

Submodules import diffusers only when they need it, so ``import meanflow.models`` works
without diffusers installed; use ``meanflow.models.flux`` for forward-mode AD through a stock
FLUX transformer (``enable_jvp_attention``) and ``meanflow.models.flux_student`` for the
MeanFlow roles (``FluxStudent`` with its pair-mode ``forward_with_tangent``, ``FluxTeacher``,
``FluxCondition``).
"""
