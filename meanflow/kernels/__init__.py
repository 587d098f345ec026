"""Triton kernels and their launchers (installed as ``meanflow.kernels``). No autograd here.

Two rules the memory-bound kernels (norms, modulation, activations, RoPE, gated residual) keep,
checked for sm_90 by ``bench/hopper_report.py`` (its "ld after st" column):

- **Loads first.** Every tile a program streams is loaded before its first store. The compiler
  does not move a load above a store that may alias it, so a tangent loaded after the primal's
  store is issued only once the primal's data has arrived and been used: two memory round trips
  in series per program instead of one.
- **Broadcast rows in the tile's layout.** A row shared by the tile (a weight, a gate) is loaded
  as a full tile with stride 0 along the broadcast dimension, not as a 1-D load broadcast
  afterwards: the latter can be converted through shared memory, with barriers. The repeated
  addresses are served by L1.
"""
