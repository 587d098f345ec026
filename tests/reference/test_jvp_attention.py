"""The plain-torch reference: gradcheck in float64 and its memory bound."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from meanflow.ops import JVP_ATTENTION, apply_pair
from meanflow.reference.jvp_attention import jvp_attention_forward


def test_reference_gradcheck_float64():
    """Backward (FlashAttention-2 form) and forward AD of the reference, against finite differences."""
    q = torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 9, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 1, 1, 9) > 0.3
    mask[..., 0] = True

    def attention(q, k, v):
        return apply_pair(JVP_ATTENTION, (q, k, v, mask), (None, None, None, None), (True, 0.4, "reference"))[0]

    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_reference_chunks_give_the_unchunked_result(monkeypatch):
    """The online softmax across key chunks equals one chunk over all keys."""
    from meanflow.reference import jvp_attention as ref

    q, k, v, tq, tk, tv = (torch.randn(1, 2, n, 16, dtype=torch.float64) for n in (40, 100, 100, 40, 100, 100))
    whole = ref.jvp_attention_forward(q, k, v, tq, tk, tv)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 1)  # 16 keys per chunk
    chunked = ref.jvp_attention_forward(q, k, v, tq, tk, tv)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from meanflow.reference.jvp_attention import jvp_attention_forward
    torch.set_num_threads(1)
    n, d = 8192, 64
    q, k, v, tq, tk, tv = (torch.randn(1, 1, n, d) for _ in range(6))
    if sys.argv[1] == "math":
        def run():
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv))
    else:
        def run():
            return jvp_attention_forward(q, k, v, tq, tk, tv)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outputs = run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - before) / 1024)  # ru_maxrss is in KiB on Linux: MiB
""")


def _extra_peak_mib(which: str) -> float:
    # A fixed mmap threshold: glibc otherwise raises it after each freed large block, so later
    # chunk buffers come from the heap, whose fragments make the peak vary (135-261 MiB seen
    # for the same run); with it, every buffer over 1 MiB is mapped and unmapped (109 MiB each time).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, which], capture_output=True, text=True,
                            check=True, env=env)
    return float(result.stdout.strip().splitlines()[-1])


def test_reference_jvp_memory_at_8192_tokens():
    """Extra peak memory of a JVP at 8,192 tokens, one head, d = 64, float32: under 200 MiB.

    Measured as the growth of the process's peak resident memory in a fresh interpreter; math
    SDPA under torch.func.jvp is measured the same way as a control that the measure can fail.
    """
    ours = _extra_peak_mib("reference")
    math = _extra_peak_mib("math")
    print(f"extra peak memory: reference {ours:.0f} MiB, math SDPA {math:.0f} MiB")
    assert ours < 200, f"reference JVP used {ours:.0f} MiB extra"
    assert math > 500, f"control: math SDPA JVP used only {math:.0f} MiB, the measure looks broken"
