"""Compile every Triton kernel of the package for an H100 (sm_90) on a CPU-only machine.

For each kernel variant, dtype, shape and autotune configuration, this compiles the kernel
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (no GPU needed, DESIGN §5) and reads
from the cubin, with the ``cuobjdump`` / ``nvdisasm`` that ship in the Triton wheel:

    regs     registers per thread                         (cuobjdump --dump-resource-usage)
    spill    stack frame + local memory bytes per thread  (same; 0 = no spills)
    st/ld    STL / LDL instructions in the SASS (spill stores / loads), and in brackets those
             inside a loop (a backward branch's range): spills there cost every iteration
    smem     shared memory per CTA, bytes: static (cubin; 1 KiB on sm_90 is the system-reserved
             block) + dynamic (compiled metadata ``shared``); an H100 CTA fits in 228 KiB total
             (227 KiB opt-in + that reserved 1 KiB)
    loop     SASS instructions in the main (longest) loop per iteration, and in brackets on its
             common path (less the longest block a forward branch inside it skips: the attention
             forward's lazy rescale); fewer per key block is less issue time beside the MMAs
    ldg/stg 128-bit  global loads / stores that move 16 bytes (LDG.E.128, STG.E.128) out of all
             of them, "128-bit/all" (the second table): memory-bound kernels want their tile
             traffic in 16-byte vectors
    ld after st  global loads issued after a global store of the same pass (straight-line code or
             one loop body): the compiler keeps that order, as the store may alias the load, so
             the load waits for the store; memory-bound kernels want 0 (all loads first)
    lazy     the attention forward's rescale form (LAZY_RESCALE, autotuned: yes = lazy, no = eager)
    hgmma    HGMMA instructions in the SASS (wgmma in use; 0 = mma.sync or FMA fallback; only the
             attention kernels have matrix products: the row and elementwise kernels show 0)
    cta/sm   CTAs per SM allowed by registers, shared memory and warps
    keep     whether the autotuner's early pruning (shared memory, registers) keeps the configuration

Shapes are FLUX's (B=1, 24 heads, 4096 image + 512 text tokens, contiguous (B, H, N, D)):
Triton specializes integer arguments on divisibility by 16 and on == 1, so the arguments are
built as the launchers in ``meanflow.kernels.jvp_attention`` pass them and specialized with
Triton's own rules. Head dim 72 is padded to BLOCK_D = 128 as the launcher does.

The other kernels (RMS norm, LayerNorm + modulation, activations, RoPE, gated residual; the
linear op is cuBLAS, no Triton kernel) are built the same way from their launchers' calls at
FLUX's shapes, one function per op below (``_rms_norm_values`` ...; its docstring says which
shapes), in bf16 and fp16, as variants fwd_jvp (every tangent given), fwd (primal only) and
bwd: the autotuned row kernels for every configuration their own pruning keeps (at these
shapes it drops only repeats of a kept tiling), the others for the one configuration their
launcher passes (with Triton's default num_stages). They are printed in a second table.

    python bench/hopper_report.py                 # every configuration (about 8 min on 2 cores)
    python bench/hopper_report.py --quick         # per kernel variant in bf16 (attention at d=128),
                                                  # the first configuration the pruning keeps
    python bench/hopper_report.py --json out.json # where the rows go (default bench/hopper_report.json)

The exit status is 1 if any compile failed. The helpers (``compile_and_inspect``,
``missing_tools``) are importable from this file; ``tests/kernels/test_hopper_compile.py`` runs
``--quick`` in a subprocess.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_ARCH = 90
SMEM_PER_CTA_MAX = 228 * 1024  # 227 KiB opt-in dynamic + the 1 KiB the system reserves per CTA
SMEM_PER_SM = 228 * 1024
REGS_PER_SM = 65536
WARPS_PER_SM = 64

# FLUX.1 at 1024²: 24 heads, 4096 image + 512 text tokens, one sample.
FLUX = dict(batch=1, heads=24, tokens=4608)
HEAD_DIMS = (64, 72, 128)
DTYPES = ("bf16", "fp16")
VARIANTS = ("fwd_jvp", "fwd", "bwd_dkdv", "bwd_dq")
KERNEL_OF = {
    "fwd_jvp": "_jvp_attention_fwd_kernel",
    "fwd": "_jvp_attention_fwd_kernel",
    "bwd_dkdv": "_jvp_attention_bwd_dkdv_kernel",
    "bwd_dq": "_jvp_attention_bwd_dq_kernel",
}


def tools_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def missing_tools() -> list[str]:
    """Names of the nvidia backend tools this needs that are absent or not executable."""
    try:
        bin_dir = tools_dir()
    except ImportError:
        return ["triton"]
    return [name for name in ("ptxas", "cuobjdump", "nvdisasm")
            if not os.access(bin_dir / name, os.X_OK)]


def _kernel_module(name: str = "jvp_attention"):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter has one config of its own, no compiler")
    import importlib

    from triton.runtime.jit import JITFunction

    module = importlib.import_module(f"meanflow.kernels.{name}")
    kernel = importlib.import_module("meanflow.kernels.jvp_attention")._jvp_attention_fwd_kernel
    if not isinstance(_layers(kernel)[-1], JITFunction):
        raise RuntimeError("meanflow.kernels was imported in interpreter mode")
    return module


def _jvp_attention_module():
    return _kernel_module("jvp_attention")


# --------------------------------------------------------------------------------------------
# Kernel arguments, as the launchers pass them
# --------------------------------------------------------------------------------------------

def launch_args(variant: str, dtype: str, head_dim: int, *, causal: bool = False, mask: str = "none",
                varlen: bool = False) -> dict:
    """Name -> value of every argument of the variant's kernel except BLOCK_M / BLOCK_N and what
    the kernel's heuristics derive from them (``with_heuristics`` adds those).

    Tensors are ``MockTensor`` (16-byte aligned); ``mask`` is "none" or "keys" (a bool
    (B, 1, 1, Nk) key-padding mask, read as one row per key); ``varlen``: packed sequences
    (``jvp_attention_varlen``) of FLUX's length, with the launcher's (N, H, D) strides.
    """
    import torch
    from triton.runtime.jit import MockTensor

    ja = _jvp_attention_module()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    b, h, n, d = FLUX["batch"], FLUX["heads"], FLUX["tokens"], head_dim
    # Strides of b, h and the token axis: contiguous (B, H, N, D), or packed (N, H, D) viewed so.
    layout = (b * n * h * d, d, h * d) if varlen else (h * n * d, n * d, d)
    outputs = layout  # out, out_dot, dq, dk, dv: the same layout, strides in elements
    if d % 8 == 0:  # rows on 16-byte boundaries: the launcher passes strides in units of 8
        layout = tuple(s // 8 for s in layout)
    strides = {p: layout for p in ("q", "k", "v", "tq", "tk", "tv", "g")}
    strides.update({p: outputs for p in ("o", "dq", "dk", "dv")}, l=(h * n, n))
    if variant == "bwd_dq":  # reads the forward's output (for Δ) with the inputs' aligned strides
        strides["o"] = layout
    if mask == "none":
        mask_strides, mask_kind, mask_bool = (0, 0, 0, 0), ja.MASK_NONE, False
        mask_t = MockTensor(torch_dtype)
    elif mask == "keys":  # (B, 1, 1, Nk) bool expanded to (B, H, Nq, Nk), viewed as uint8
        mask_strides, mask_kind, mask_bool = (n, 0, 0, 1), ja.MASK_KEYS, True
        mask_t = MockTensor(torch.uint8)
    else:
        raise ValueError(mask)
    tangent = variant == "fwd_jvp"
    values = dict(
        Mask=mask_t, Lse=MockTensor(torch.float32), Delta=MockTensor(torch.float32),
        Cu_q=MockTensor(torch.int32), Cu_k=MockTensor(torch.int32), VARLEN=varlen,
        n_heads=h, n_kv_heads=h, n_queries=n, n_keys=n, HEAD_DIM=d, VALUE_DIM=d, group=1, scale=d ** -0.5,
        rescale_threshold=ja._rescale_threshold(torch_dtype),
        ROWS_ALIGNED=d % 8 == 0,  # contiguous rows of d elements: the launcher's check
        IS_CAUSAL=causal, MASK_KIND=mask_kind, MASK_BOOL=mask_bool, PRECISION="tf32",
        HAS_Q_DOT=tangent, HAS_K_DOT=tangent, HAS_V_DOT=tangent,
        BLOCK_D=ja._head_block(d), BLOCK_DV=ja._head_block(d),
    )
    kernel = getattr(ja, KERNEL_OF[variant])
    fn = _jit(kernel)
    for name in fn.arg_names:
        if name.startswith("stride_m"):
            values[name] = mask_strides["bhmn".index(name[-1])]
        elif name.startswith("stride_"):
            values[name] = strides[name[len("stride_"):-1]]["bhmn".index(name[-1]) if name[-1] != "n" else 2]
    return build_args(fn, values, torch_dtype, skip=("BLOCK_M", "BLOCK_N", *_heuristics(kernel)))


def build_args(fn, values: dict, dtype, skip=()) -> dict:
    """Name -> value of every argument of ``fn`` (a JITFunction) except ``skip``: from ``values``,
    else, for a pointer (a capitalised name, or one ending in ``_ptr``), a ``MockTensor`` of
    ``dtype`` (a torch dtype: the inputs', which the outputs and gradients share)."""
    from triton.runtime.jit import MockTensor

    args = {}
    for name in fn.arg_names:
        if name in skip:
            continue
        if name in values:
            args[name] = values[name]
        elif name[0].isupper() or name.endswith("_ptr"):
            args[name] = MockTensor(dtype)
        else:
            raise KeyError(f"no value for argument {name!r} of {fn.__name__}")
    return args


# --------------------------------------------------------------------------------------------
# The other kernels: row-wise and elementwise, as their launchers call them at FLUX's shapes
# --------------------------------------------------------------------------------------------

H100_SMS = 132
WIDTH, MLP_WIDTH = 3072, 12288  # FLUX's hidden size and MLP width


def _torch_dtype(dtype: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def _reduction_programs(n_blocks: int) -> int:
    """``jvp_rms_norm.reduction_programs`` on an H100: 4 programs per SM, at most one per row block."""
    return max(1, min(4 * H100_SMS, n_blocks))


def _rms_norm_values(variant: str, dtype: str) -> dict:
    """the q/k norms: x (1, 24, 4608, 128) as 110592 contiguous rows of 128, weight (128,) in x's
    dtype, eps 1e-6; fwd_jvp with the tangents of x and weight; bwd needs dx and dw."""
    from triton.runtime.jit import MockTensor

    rn = _kernel_module("jvp_rms_norm")
    n_rows, d = FLUX["batch"] * FLUX["heads"] * FLUX["tokens"], 128
    block_d = rn.row_block(d)
    values = dict(n_rows=n_rows, n_cols=d, stride_x=d, eps=1e-6, HAS_W=True, BLOCK_D=block_d)
    if variant == "bwd":
        n_blocks = -(-n_rows // rn.rows_per_program(rn.ROW_TILES[0][0], block_d))
        return dict(values, stride_g=d, n_programs=_reduction_programs(n_blocks), NEEDS_DX=True,
                    NEEDS_DW=True, DW_PARTIAL=MockTensor(_torch_dtype("fp32")))
    tangent = variant == "fwd_jvp"
    return dict(values, stride_x_dot=d, HAS_X_DOT=tangent, HAS_W_DOT=tangent)


def _layer_norm_modulate_values(variant: str, dtype: str) -> dict:
    """x (1, 4608, 3072) contiguous, scale and shift (1, 3072) in x's dtype, eps 1e-6; fwd_jvp with
    the tangents of x, scale and shift; bwd needs dx, dscale and dshift."""
    from triton.runtime.jit import MockTensor

    ln = _kernel_module("jvp_layer_norm_modulate")
    batch, n, d = FLUX["batch"], FLUX["tokens"], WIDTH
    block_d = ln.row_block(d)
    x_strides = dict(stride_x_b=n * d, stride_x_n=d)
    if variant == "bwd":
        n_blocks = -(-n // ln.rows_per_program(ln.ROW_TILES[0][0], block_d))
        n_programs = min(max(1, _reduction_programs(n_blocks * batch) // batch), n_blocks)
        fp32 = MockTensor(_torch_dtype("fp32"))
        return dict(x_strides, n_tokens=n, n_cols=d, stride_g_b=n * d, stride_g_n=d, stride_scale_b=d,
                    eps=1e-6, n_programs=n_programs, NEEDS_DX=True, NEEDS_DSCALE=True, NEEDS_DSHIFT=True,
                    BLOCK_D=block_d, DSCALE_PARTIAL=fp32, DSHIFT_PARTIAL=fp32)
    tangent = variant == "fwd_jvp"
    return dict(x_strides, n_rows=batch * n, n_tokens=n, n_cols=d, stride_x_dot_b=n * d, stride_x_dot_n=d,
                stride_scale_b=d, stride_scale_dot_b=d, stride_shift_b=d, stride_shift_dot_b=d, eps=1e-6,
                HAS_X_DOT=tangent, HAS_SCALE_DOT=tangent, HAS_SHIFT_DOT=tangent, BLOCK_D=block_d)


def _activation_values(variant: str, dtype: str, kind: str = "gelu_tanh") -> dict:
    """the MLP: x (1, 4608, 12288) contiguous, GELU (tanh) and SiLU; fwd_jvp with ẋ; bwd is the
    same kernel with the output gradient as the tangent and no primal output."""
    act = _kernel_module("jvp_activation")
    return dict(n_elements=FLUX["batch"] * FLUX["tokens"] * MLP_WIDTH, TWO_C=act._TWO_C, A=act._A,
                KIND=act._KINDS[kind], WRITE_PRIMAL=variant != "bwd", HAS_TANGENT=variant != "fwd",
                BLOCK=act.BLOCK)


def _rope_values(variant: str, dtype: str) -> dict:
    """q/k: x (1, 24, 4608, 128) a transposed view of (1, 4608, 24, 128) (and ẋ alike), cos and
    sin (4608, 128) fp32 (FluxPosEmbed's); bwd: the transposed rotation of a contiguous gradient."""
    import triton
    from triton.runtime.jit import MockTensor

    rope = _kernel_module("jvp_rope")
    b, h, n, d = FLUX["batch"], FLUX["heads"], FLUX["tokens"], 128
    strides = (n * h * d, d, h * d) if variant != "bwd" else (h * n * d, n * d, d)  # of b, h, n
    fp32 = MockTensor(_torch_dtype("fp32"))
    return dict(cos_ptr=fp32, sin_ptr=fp32, **dict(zip(("stride_xb", "stride_xh", "stride_xn"), strides)),
                **dict(zip(("stride_tb", "stride_th", "stride_tn"), strides)), stride_cn=d, stride_sn=d,
                n_heads=h, n_tokens=n, dim=d, HAS_TANGENT=variant == "fwd_jvp", TRANSPOSE=variant == "bwd",
                BLOCK_N=rope.BLOCK_N, BLOCK_D=max(triton.next_power_of_2(d), 2))


def _gated_residual_values(variant: str, dtype: str) -> dict:
    """h, y (1, 4608, 3072) contiguous, gate (1, 3072) in their dtype; fwd_jvp with the tangents
    of h, gate and y; bwd needs dy and dgate."""
    from triton.runtime.jit import MockTensor

    gr = _kernel_module("jvp_gated_residual")
    b, n, d = FLUX["batch"], FLUX["tokens"], WIDTH
    blocks = dict(BLOCK_N=gr.BLOCK_N, BLOCK_D=gr.BLOCK_D)
    if variant == "bwd":
        return dict(blocks, dg_partial_ptr=MockTensor(_torch_dtype("fp32")), s_gob=n * d, s_gon=d, s_gb=d,
                    s_yb=n * d, s_yn=d, n_tokens=n, dim=d, n_batch=b, NEED_Y=True, NEED_G=True,
                    CHUNK_N=gr.CHUNK_N)
    tangent = variant == "fwd_jvp"
    return dict(blocks, s_hb=n * d, s_hn=d, s_gb=d, s_yb=n * d, s_yn=d, s_hdb=n * d, s_hdn=d, s_gdb=d,
                s_ydb=n * d, s_ydn=d, n_tokens=n, dim=d, HAS_H_DOT=tangent, HAS_G_DOT=tangent,
                HAS_Y_DOT=tangent)


LATENT = 4096 * 64  # FLUX's packed latents of one 1024² image: 4096 tokens × 64 channels


def _loss_values(variant: str, dtype: str, module: str) -> dict:
    """the losses over B = 8 samples of packed latents (8, 4096·64), contiguous: fwd stores the
    residual for the backward (fwd_jvp: the call with a gradient; fwd: without)."""
    from triton.runtime.jit import MockTensor

    loss = _kernel_module(module)
    n_blocks = -(-LATENT // loss.BLOCK)
    fp32 = MockTensor(_torch_dtype("fp32"))
    partials = (dict(partial_ptr=fp32) if module == "adaptive_weighted_loss"
                else dict(abs_partial_ptr=fp32, sq_partial_ptr=fp32))
    strides = {name: LATENT for name in ("s_ub", "s_tb", "s_xb", "s_fb")}
    return dict(partials, **strides, n_elem=LATENT, n_blocks=n_blocks, STORE_D=variant == "fwd_jvp",
                BLOCK=loss.BLOCK)


def _per_sample_scale_values(variant: str, dtype: str) -> dict:
    """the losses' backward: grad (8, 4096·64) = scale (8,) float32 · residual."""
    from triton.runtime.jit import MockTensor

    return dict(scale_ptr=MockTensor(_torch_dtype("fp32")), n_elem=LATENT,
                BLOCK=_kernel_module("per_sample_scale").BLOCK)


# op -> (module in meanflow.kernels, kernel per variant, argument values (variant, dtype, **case),
#        the cases: keyword arguments of the values function, the same keys in each; the first is --quick's).
OPS = {
    "rms_norm": ("jvp_rms_norm", dict(fwd_jvp="_jvp_rms_norm_kernel", fwd="_jvp_rms_norm_kernel",
                                      bwd="_rms_norm_bwd_kernel"), _rms_norm_values, [{}]),
    "layer_norm_modulate": ("jvp_layer_norm_modulate",
                            dict(fwd_jvp="_jvp_layer_norm_modulate_kernel",
                                 fwd="_jvp_layer_norm_modulate_kernel",
                                 bwd="_layer_norm_modulate_bwd_kernel"),
                            _layer_norm_modulate_values, [{}]),
    "activation": ("jvp_activation", dict.fromkeys(("fwd_jvp", "fwd", "bwd"), "_jvp_activation_kernel"),
                   _activation_values, [dict(kind="gelu_tanh"), dict(kind="silu")]),
    "rope": ("jvp_rope", dict.fromkeys(("fwd_jvp", "fwd", "bwd"), "_jvp_rope_kernel"), _rope_values, [{}]),
    "gated_residual": ("jvp_gated_residual",
                       dict(fwd_jvp="_jvp_gated_residual_fwd_kernel", fwd="_jvp_gated_residual_fwd_kernel",
                            bwd="_jvp_gated_residual_bwd_kernel"), _gated_residual_values, [{}]),
    # Loss kernels: "fwd_jvp" is the forward that also stores the residual for the backward.
    "adaptive_weighted_loss": ("adaptive_weighted_loss",
                               dict.fromkeys(("fwd_jvp", "fwd"), "_adaptive_weighted_loss_fwd_kernel"),
                               _loss_values, [dict(module="adaptive_weighted_loss")]),
    "alignment_loss": ("alignment_loss", dict.fromkeys(("fwd_jvp", "fwd"), "_alignment_loss_fwd_kernel"),
                       _loss_values, [dict(module="alignment_loss")]),
    "per_sample_scale": ("per_sample_scale", dict(bwd="_per_sample_scale_kernel"), _per_sample_scale_values,
                         [{}]),
}
# Kernels without autotuning: the meta-parameters their launchers pass from module constants
# (shown as the configuration), with the module's NUM_WARPS and Triton's default num_stages.
FIXED_META = {
    "_jvp_activation_kernel": ("BLOCK",),
    "_jvp_rope_kernel": ("BLOCK_N",),
    "_jvp_gated_residual_fwd_kernel": ("BLOCK_N", "BLOCK_D"),
    "_jvp_gated_residual_bwd_kernel": ("CHUNK_N", "BLOCK_N", "BLOCK_D"),
    "_adaptive_weighted_loss_fwd_kernel": ("BLOCK",),
    "_alignment_loss_fwd_kernel": ("BLOCK",),
    "_per_sample_scale_kernel": ("BLOCK",),
}


def _kernel(case: dict):
    """The case's kernel object: an Autotuner or a JITFunction."""
    module, kernels = (("jvp_attention", KERNEL_OF) if case["op"] == "attention"
                       else OPS[case["op"]][:2])
    return getattr(_kernel_module(module), kernels[case["variant"]])


def _layers(kernel) -> list:
    """The kernel object and what it wraps (an Autotuner's and a Heuristics' ``fn``), outermost
    first, down to the JITFunction (in interpreter mode, down to the plain function)."""
    from triton.runtime.jit import JITFunction

    layers = [kernel]
    while not isinstance(layers[-1], JITFunction) and hasattr(layers[-1], "fn"):
        layers.append(layers[-1].fn)
    return layers


def _jit(kernel):
    """The JITFunction under an Autotuner and its Heuristics, or the JITFunction itself."""
    return _layers(kernel)[-1]


def _heuristics(kernel) -> dict:
    """Name -> function of the arguments, for each meta-parameter that a ``triton.heuristics``
    between the kernel's Autotuner and its JITFunction derives at launch, outermost first."""
    from triton.runtime.autotuner import Heuristics

    return {name: derive for layer in _layers(kernel) if isinstance(layer, Heuristics)
            for name, derive in layer.values.items()}


def with_heuristics(kernel, args: dict) -> dict:
    """``args`` (every argument but the heuristics') completed as the launch completes them."""
    args = dict(args)
    for name, derive in _heuristics(kernel).items():
        args[name] = derive(args)
    return args


def case_args(case: dict) -> dict:
    """Name -> value of every argument of the case's kernel except the autotuned meta-parameters."""
    if case["op"] == "attention":
        return launch_args(case["variant"], case["dtype"], case["d"], causal=case["causal"],
                           mask=case["mask"], varlen=case.get("varlen", False))
    kernel = _kernel(case)
    _, _, values_of, extras = OPS[case["op"]]
    values = values_of(case["variant"], case["dtype"], **{k: case[k] for k in extras[0]})
    configs = getattr(kernel, "configs", [])
    return build_args(_jit(kernel), values, _torch_dtype(case["dtype"]),
                      skip={name for c in configs for name in c.kwargs} | set(_heuristics(kernel)))


def kernel_configs(kernel, args: dict) -> tuple[list, list]:
    """(configurations, those kept): an autotuned kernel's, and what its early pruning keeps for
    these arguments as the launcher's call (its constexprs by keyword) would; a kernel without
    autotuning: the one configuration its launcher gives it (kept)."""
    import triton
    from triton.backends.nvidia.compiler import CUDAOptions

    if not hasattr(kernel, "configs"):
        module = sys.modules[kernel.fn.__module__]
        config = triton.Config({name: args[name] for name in FIXED_META[kernel.__name__]},
                               num_warps=module.NUM_WARPS, num_stages=CUDAOptions.num_stages)
        return [config], [config]
    fn = _jit(kernel)
    flags = {name: args[name] for i, name in enumerate(fn.arg_names)
             if i in fn.constexprs and name in args}  # what the launcher passes by keyword
    kept = kernel.early_config_prune(kernel.configs, args, **flags) if kernel.early_config_prune \
        else kernel.configs
    return kernel.configs, kept


_TYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
               "torch.uint8": "u8"}


def specialize(fn, args: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, by Triton's launch-time rules.

    signature: name -> "*bf16" / "*fp32" / "*u8" / "i32" / "i64" / "fp32" / "constexpr" for
    every parameter; constexprs: name -> value for constexpr parameters and integers equal to 1;
    attrs: (index,) -> [["tt.divisibility", 16]] for pointers and integers divisible by 16.
    """
    from triton.backends.compiler import BaseBackend

    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:  # older Triton: the same rules, for the argument types used here
        def native_specialize_impl(_, value, is_const, specialize, align):
            if hasattr(value, "data_ptr"):
                return "*" + _TYPE_NAMES[str(value.dtype)], "D"
            if isinstance(value, float):
                return "fp32", None
            if value == 1:
                return "constexpr", 1
            return ("i32" if -2**31 <= value < 2**31 else "i64"), ("D" if value % 16 == 0 else "")

    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = args[name]
        if index in fn.constexprs:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = key
        elif isinstance(key, str) and BaseBackend.parse_attr(key):
            attrs[(index,)] = BaseBackend.parse_attr(key)
    return signature, constexprs, attrs


# --------------------------------------------------------------------------------------------
# Compile and inspect
# --------------------------------------------------------------------------------------------

def _inspect_cubin(cubin: bytes, name: str) -> dict:
    bin_dir = tools_dir()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([bin_dir / "cuobjdump", "--dump-resource-usage", path],
                               check=True, capture_output=True, text=True).stdout
        sass = subprocess.run([bin_dir / "nvdisasm", path], check=True, capture_output=True, text=True).stdout
    line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    res = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    return dict(regs=res["REG"], stack=res["STACK"], local=res["LOCAL"], smem_static=res["SHARED"],
                **sass_counts(sass))


def sass_counts(sass: str) -> dict:
    """Instruction counts of ``nvdisasm`` output: local-memory traffic (spills), HGMMA (wgmma in
    use), global loads and stores (how many are 128-bit, how many loads follow a store), and
    the main loop's length per warp, whole and on its common path."""
    # Instructions in order, and where each label points; a branch back to a label closes a loop.
    instructions, labels = [], {}
    for text in sass.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", text):
            labels[label.group(1)] = len(instructions)
        elif instruction := re.search(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", text):
            instructions.append(instruction.group(1))
    # Code after the last unconditional EXIT is out of line (the retry of an mbarrier wait, which
    # branches back into the loop it came from): its branches back close no loop.
    body_end = max((i for i, ins in enumerate(instructions) if re.fullmatch(r"EXIT\s*", ins)),
                   default=len(instructions))
    in_loop, loops = set(), []
    for index, instruction in enumerate(instructions[:body_end]):
        branch = re.search(r"\bBRA\b.*?(\.L_x_\d+)", instruction)
        if branch and labels.get(branch.group(1), index + 1) <= index:
            in_loop.update(range(labels[branch.group(1)], index + 1))
            if labels[branch.group(1)] < index:  # not a branch to itself (a spin wait)
                loops.append((labels[branch.group(1)], index))
    # The main loop (the longest), and its common path: without the longest block that a forward
    # branch inside it can skip (the attention forward's lazy rescale).
    loop_len = loop_common = 0
    if loops:
        first, last = max(loops, key=lambda span: span[1] - span[0])
        loop_len = last - first + 1
        skippable = [labels[b.group(1)] - i - 1 for i in range(first, last + 1)  # (the branch runs)
                     if (b := re.search(r"\bBRA\b.*?(\.L_x_\d+)", instructions[i]))
                     and i < labels.get(b.group(1), -1) <= last]
        loop_common = loop_len - max(skippable, default=0)

    def count(pattern, where=range(len(instructions))):
        return sum(1 for i in where if re.search(pattern, instructions[i]))

    # Global loads issued after a global store of the same pass (straight-line code, or one loop
    # body): the compiler keeps that order (the store may alias), so such a load waits for the
    # store and a memory-bound kernel has fewer bytes in flight.
    def region(i):
        return next((span for span in loops if span[0] <= i <= span[1]), None)

    stores = [i for i in range(len(instructions)) if re.search(r"\bSTG\.", instructions[i])]
    late_loads = sum(1 for i in range(len(instructions)) if re.search(r"\bLDG\.", instructions[i])
                     and any(j < i and region(j) == region(i) for j in stores))

    return dict(
        stl=count(r"\bSTL\b"), ldl=count(r"\bLDL\b"), hgmma=count(r"\bHGMMA\."),
        ldg=count(r"\bLDG\."), ldg128=count(r"\bLDG\.E\.128\b"),
        stg=count(r"\bSTG\."), stg128=count(r"\bSTG\.E\.128\b"),
        loop_stl=count(r"\bSTL\b", in_loop), loop_ldl=count(r"\bLDL\b", in_loop),
        loop_len=loop_len, loop_common=loop_common, ldg_after_stg=late_loads,
    )


def compile_and_inspect(fn, args: dict, num_warps: int, num_stages: int,
                        capability: int = TARGET_ARCH) -> dict:
    """Compile ``fn`` (a JITFunction) with ``args`` (every argument, the configuration's
    meta-parameters included) for sm_``capability`` and return its resource usage."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs = specialize(fn, args)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    start = time.perf_counter()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True  # real compile times, and the ptxas log below
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
    seconds = time.perf_counter() - start
    row = _inspect_cubin(kernel.asm["cubin"], fn.__name__)
    row["smem_dynamic"] = kernel.metadata.shared
    row["smem"] = row["smem_static"] + row["smem_dynamic"]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    row["ptxas_spill_stores"], row["ptxas_spill_loads"] = (map(int, spills.groups()) if spills
                                                            else (None, None))
    row["spill"] = row["stack"] + row["local"]
    row["fits_smem"] = row["smem"] <= SMEM_PER_CTA_MAX
    regs_per_warp = -(-row["regs"] // 8) * 8 * 32  # allocated per warp in units of 256 registers
    row["ctas_per_sm"] = min(REGS_PER_SM // (regs_per_warp * num_warps), WARPS_PER_SM // num_warps,
                             SMEM_PER_SM // max(row["smem"], 1))
    row["compile_s"] = round(seconds, 2)
    return row


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

def tasks(quick: bool) -> list[dict]:
    """Every (op, variant, dtype, head dim, mask, causal, config) to compile."""
    cases = [dict(op="attention", variant=v, dtype=t, d=d, causal=False, mask="none")
             for t in DTYPES for d in HEAD_DIMS for v in VARIANTS]
    cases += [dict(op="attention", variant=v, dtype="bf16", d=128, causal=c, mask=m)
              for c, m in ((True, "none"), (False, "keys")) for v in VARIANTS]
    cases += [dict(op="attention", variant=v, dtype="bf16", d=128, causal=False, mask="none", varlen=True)
              for v in VARIANTS]  # jvp_attention_varlen: packed sequences
    if quick:
        cases = [c for c in cases if c["dtype"] == "bf16" and c["d"] == 128 and not c["causal"]
                 and c["mask"] == "none"]
    for op, (_, kernels, _, extras) in OPS.items():
        cases += [dict(extra, op=op, variant=v, dtype=t) for extra in (extras[:1] if quick else extras)
                  for t in (DTYPES[:1] if quick else DTYPES) for v in kernels]
    out = []
    for case in cases:
        kernel = _kernel(case)
        configs, kept = kernel_configs(kernel, case_args(case))
        for index, config in enumerate(configs):
            if quick and config is not next(c for c in configs if c in kept):
                continue
            if case["op"] != "attention" and config not in kept:  # here: repeats of a kept tiling
                continue
            if config.num_ctas != 1 or config.maxnreg is not None:
                raise NotImplementedError(f"config {config} sets num_ctas / maxnreg")
            meta = dict(config.kwargs) if case["op"] == "attention" else dict(meta=dict(config.kwargs))
            out.append(dict(case, kernel=_jit(kernel).__name__, config=index, **meta,
                            warps=config.num_warps, stages=config.num_stages, kept=config in kept))
    return out


def run_task(task: dict) -> dict:
    meta = task["meta"] if "meta" in task else {k: task[k] for k in ("BLOCK_M", "BLOCK_N", "LAZY_RESCALE")
                                                  if k in task}
    kernel = _kernel(task)
    args = with_heuristics(kernel, dict(case_args(task), **meta))
    try:
        result = compile_and_inspect(_jit(kernel), args, task["warps"], task["stages"])
    except Exception as error:  # a failed compile is a finding, not a crash of the report
        result = dict(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}")
    return dict(task, **result)


COLUMNS = [  # header, key, width
    ("kernel", "kernel", 30), ("variant", "label", 15), ("dtype", "dtype", 5), ("d", "d", 3),
    ("BM", "BLOCK_M", 3), ("BN", "BLOCK_N", 3), ("lazy", "lazy_text", 4), ("w", "warps", 2), ("s", "stages", 2),
    ("regs", "regs", 4), ("spill", "spill", 5), ("st/ld (loop)", "stl_ldl", 13), ("smem", "smem", 6),
    ("hgmma", "hgmma", 5), ("loop (common)", "loop_text", 13), ("cta/sm", "ctas_per_sm", 6),
    ("keep", "keep", 4), ("sec", "compile_s", 5),
    ("notes", "notes", 0),
]
OTHER_COLUMNS = [  # the other kernels: their configuration's meta-parameters instead of head dim and tiles
    ("kernel", "kernel", 31), ("variant", "label", 17), ("dtype", "dtype", 5), ("config", "meta_text", 34),
    *COLUMNS[7:-3], ("ldg/stg 128-bit", "vectors", 15), ("ld after st", "ldg_after_stg", 11), *COLUMNS[-3:],
]


def _label(row: dict) -> str:
    if row["op"] != "attention":
        return row["variant"] + "".join(f"+{row[k]}" for k in OPS[row["op"]][3][0])
    causal = "+causal" if row["causal"] else ""
    return (row["variant"] + causal + ("+keymask" if row["mask"] != "none" else "")
            + ("+varlen" if row.get("varlen") else ""))


def _order(row: dict) -> tuple:
    if row["op"] == "attention":
        return (0, row.get("varlen", False), row["causal"], row["mask"] != "none", VARIANTS.index(row["variant"]),
                DTYPES.index(row["dtype"]), row["d"], row["config"])
    _, kernels, _, extras = OPS[row["op"]]
    return (1, list(OPS).index(row["op"]), extras.index({k: row[k] for k in extras[0]}),
            list(kernels).index(row["variant"]), DTYPES.index(row["dtype"]), row["config"])


def format_row(row: dict, columns: list = COLUMNS) -> str:
    cells = dict(row, label=_label(row), keep="yes" if row["kept"] else "no",
                 meta_text=" ".join(f"{k}={v}" for k, v in row.get("meta", {}).items()),
                 lazy_text={True: "yes", False: "no"}.get(row.get("LAZY_RESCALE"), "–"))
    if "error" in row:
        cells["notes"] = "COMPILE FAILED: " + row["error"]
    else:
        cells["stl_ldl"] = f"{row['stl']}/{row['ldl']} ({row['loop_stl']}/{row['loop_ldl']})"
        cells["vectors"] = f"{row['ldg128']}/{row['ldg']} {row['stg128']}/{row['stg']}"
        cells["loop_text"] = f"{row['loop_len']} ({row['loop_common']})" if row["loop_len"] else "–"
        notes = []
        if row["spill"]:
            notes.append("SPILLS IN LOOP" if row["loop_stl"] or row["loop_ldl"] else "spills outside loop")
        if not row["fits_smem"]:
            notes.append(f"SMEM > {SMEM_PER_CTA_MAX // 1024} KiB")
        if row["hgmma"] == 0 and row["op"] == "attention":
            notes.append("no wgmma")
        cells["notes"] = ", ".join(notes)
    return " ".join(str(cells.get(key, "-")).rjust(width) if width else str(cells.get(key, ""))
                    for _, key, width in columns)


def header(columns: list = COLUMNS) -> str:
    return " ".join(h.rjust(w) if w else h for h, _, w in columns)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="bf16 (attention at d=128), the first configuration the pruning keeps")
    parser.add_argument("--json", default=str(Path(__file__).with_suffix(".json")),
                        help="where to write the rows")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    opts = parser.parse_args(argv)

    missing = missing_tools()
    if missing:
        print(f"missing nvidia backend tools: {', '.join(missing)} (in {tools_dir()})", file=sys.stderr)
        return 2
    # The interpreter swaps in one config and no compiler; a fresh cache keeps the user's clean.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    cache = tempfile.mkdtemp(prefix="hopper_report_cache_")
    os.environ["TRITON_CACHE_DIR"] = cache

    import triton

    start = time.perf_counter()
    todo = sorted(tasks(opts.quick), key=lambda t: (t["op"] != "attention", t["variant"] != "fwd_jvp",
                                                     -t.get("BLOCK_M", 0) * t.get("BLOCK_N", 0)))
    rows = []
    print(f"# triton {triton.__version__}, target cuda sm_{TARGET_ARCH}, {len(todo)} compiles on "
          f"{opts.workers} worker(s); FLUX shapes B={FLUX['batch']} H={FLUX['heads']} N={FLUX['tokens']}",
          flush=True)
    try:
        if opts.workers > 1 and len(todo) > 1:
            context = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(opts.workers, mp_context=context) as pool:
                rows = list(pool.map(run_task, todo))
        else:
            rows = [run_task(t) for t in todo]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    rows.sort(key=_order)
    print(header())
    for row in rows:
        if row["op"] == "attention":
            print(format_row(row))
    print("# the other kernels at FLUX's shapes:")
    for op, (_, _, values_of, _) in OPS.items():
        print(f"#   {op}: " + " ".join(values_of.__doc__.split()))
    print(header(OTHER_COLUMNS))
    for row in rows:
        if row["op"] != "attention":
            print(format_row(row, OTHER_COLUMNS))
    elapsed = time.perf_counter() - start
    failed = [r for r in rows if "error" in r]
    spilled = [r for r in rows if r.get("spill")]
    too_big = [r for r in rows if "error" not in r and not r["fits_smem"]]
    print(f"# {len(rows)} compiles in {elapsed:.0f} s: {len(failed)} failed, {len(spilled)} spill, "
          f"{len(too_big)} over {SMEM_PER_CTA_MAX // 1024} KiB shared memory")
    Path(opts.json).write_text(json.dumps(dict(
        triton=triton.__version__, target=f"cuda:{TARGET_ARCH}", shapes=FLUX, quick=opts.quick,
        seconds=round(elapsed, 1), smem_per_cta_max=SMEM_PER_CTA_MAX, rows=rows), indent=1) + "\n")
    print(f"# wrote {opts.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
