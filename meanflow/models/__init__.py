"""Adapters from real model classes (diffusers' FluxTransformer2DModel first) to MeanFlow.

Submodules import diffusers only when they need it, so ``import meanflow.models`` works
without diffusers installed; use ``meanflow.models.flux`` for the FLUX adapter.
"""
