"""Triton kernels and their launchers (installed as ``meanflow.kernels``). No autograd here."""
