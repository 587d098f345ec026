"""Peak memory of one training step on a small FLUX-shaped stack: pair mode against the baselines.

    python bench/flux_memory.py                 # CPU, the default small config, a markdown table
    python bench/flux_memory.py --device cuda   # CUDA: torch.cuda.max_memory_allocated instead
    python bench/flux_memory.py --hidden 512 --double 2 --single 4 --image-tokens 1024

Each step runs in a fresh subprocess. On the CPU its cost is the growth of the process's peak
resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over the step, measured after
the model and the inputs exist; on CUDA the growth of ``torch.cuda.max_memory_allocated``.
Steps (``--dtype``, default float32, or float32 parameters under ``--autocast bfloat16`` as the
trainer runs one process; B=2; MEANFLOW_BACKEND as set, default auto):

- ``plain``: a flow-matching step, stock diffusers forward (default SDPA) + backward;
- ``pair``: a MeanFlow step in pair mode: ``student.forward_with_tangent`` (u and the detached
  du/dt in one pass), the MeanFlow loss, backward;
- ``jvp``: ``torch.func.jvp`` of the stock model under math SDPA (the only stock backend with
  forward AD) + backward through u;
- ``two_pass``: the common workaround: the JVP under ``no_grad``, then a second forward with grad;
- ``two_pass_fused``: the same with the best attention kernel for its JVP pass (``jvp_attention``
  through ``enable_jvp_attention``) and the stock SDPA for the forward with grad;
- ``pair_compiled``: ``pair`` with the step's forward and loss through ``torch.compile``
  (``fullgraph=True``, ``--compile-backend``, default inductor); compiled by one unmeasured step
  first (its time is the result's ``compile_s``, printed to stderr). On the CPU its memory is
  not measured: the peak RSS only grows, and the compiling step has already set it;
- ``*+ckpt``: the same with per-block activation checkpointing (``jvp+ckpt`` raises
  ``CheckpointError`` in PyTorch; reported as such).

Columns: with the parameter gradients allocated before the measurement ("activations": what
the step holds beyond weights and gradients), and without (a step after
``zero_grad(set_to_none=True)``: the gradients are part of the peak).

On the CPU, glibc's malloc raises its mmap threshold dynamically once a large block is freed,
after which freed blocks stay in the heap and later allocations of other sizes do not always
reuse them: the peak RSS then measures the allocator's fragmentation as much as the step (with
the default malloc the pair step, which frees many tangent buffers of several sizes, showed
1.24x the plain step while its peak of live tensor bytes, from the profiler, was 1.06x). So the
subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536`` (every block of 64 KiB or more is its
own mapping, returned on free: the RSS follows the live tensors), and one more column repeats
the full step under the default malloc (``--allocator both``, the default; ``mmap`` or
``default`` for one). Step times come from the default-malloc run where there is one (per-block
mmaps slow the CPU down), and are indicative only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

MODES = ["plain", "pair", "jvp", "two_pass", "two_pass_fused", "plain+ckpt", "pair+ckpt", "two_pass+ckpt",
         "jvp+ckpt", "pair_compiled", "pair_compiled+ckpt"]


def _rope_axes(head_dim: int) -> list[int]:
    """FLUX splits the head dim 16/56/56 of 128; here: one quarter for axis 0, the rest in two
    even halves (all even)."""
    first = (head_dim // 4) // 2 * 2
    rest = head_dim - first
    second = rest // 2 // 2 * 2
    return [first, second, rest - second]


def run_one(mode: str, grads_columns: list[str], args) -> dict:
    """Steps of one mode in this process, one measured step per gradient column ("pre": the
    parameter gradients exist before the step, "none": the step allocates them); returns
    {column: {'mib': ..., 'ms': ...} or {'error': ...}}. On the CPU the peak RSS only grows, so
    each column needs its own process; on CUDA the peak counter is reset between columns."""

    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from meanflow.models.flux import enable_jvp_attention
    from meanflow.models.flux_student import FluxCondition, FluxStudent

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    heads = args.hidden // args.head_dim
    config = dict(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                  attention_head_dim=args.head_dim, num_attention_heads=heads,
                  joint_attention_dim=args.hidden, pooled_projection_dim=args.hidden,
                  axes_dims_rope=_rope_axes(args.head_dim))
    with torch.device(device):  # initialise on the device: a CPU init of a FLUX-width block takes seconds
        transformer = FluxTransformer2DModel(**config).to(dtype=dtype)
    side = int(round(args.image_tokens ** 0.5))
    n_img = side * side
    b, n_txt = args.batch, args.text_tokens
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    cond = FluxCondition(torch.randn(b, n_txt, args.hidden, dtype=dtype), torch.randn(b, args.hidden, dtype=dtype),
                         torch.zeros(n_txt, 3), img_ids.reshape(-1, 3)).to(device)
    z, v = (torch.randn(b, n_img, 64, device=device, dtype=dtype) for _ in range(2))
    t = torch.rand(b, device=device) * 0.8 + 0.1
    r = t * torch.rand(b, device=device)
    ones = torch.ones_like(t)

    base, ckpt = mode.split("+")[0], mode.endswith("+ckpt")
    if base in ("pair", "pair_compiled"):
        model = FluxStudent.from_transformer(transformer)
        model.gradient_checkpointing = ckpt
    else:
        model = transformer
        if ckpt:
            model.enable_gradient_checkpointing()
        if base == "two_pass_fused":  # jvp_attention where tangents flow, stock SDPA elsewhere
            enable_jvp_attention(transformer)

    # The stock forward with grad uses SDPA's FlashAttention-2 on CUDA (the FA2 reference of DESIGN
    # §6) rather than its default pick, cuDNN on Hopper, whose backward failed in this harness on
    # an H100 (a CUDA error in the plain step, 2026-11-26); on the CPU, SDPA's default.
    def stock_with_grad(z_, t_):
        with (sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]) if device.type == "cuda"
              else contextlib.nullcontext()):
            return stock(z_, t_)

    def stock(z_, t_):
        return transformer(hidden_states=z_, encoder_hidden_states=cond.encoder_hidden_states,
                           pooled_projections=cond.pooled_projections, timestep=t_, img_ids=cond.img_ids,
                           txt_ids=cond.txt_ids).sample

    def meanflow_loss(u, u_dot):
        target = v - (t - r)[:, None, None] * u_dot.detach()
        return ((u - target) ** 2).mean()

    autocast = getattr(torch, args.autocast) if args.autocast != "none" else None

    def step():
        # Under --autocast the forward and the loss run in autocast, the backward outside it.
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = step_loss()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def pair_loss():
        u, u_dot = model.forward_with_tangent(z, r, t, cond, v, None, ones)
        return meanflow_loss(u, u_dot)

    if base == "pair_compiled":
        pair_loss = torch.compile(pair_loss, backend=args.compile_backend, fullgraph=True)

    def step_loss():
        if base == "plain":
            loss = ((stock_with_grad(z, t) - v) ** 2).mean()
        elif base in ("pair", "pair_compiled"):
            loss = pair_loss()
        elif base == "jvp":
            with sdpa_kernel(SDPBackend.MATH):
                u, u_dot = torch.func.jvp(stock, (z, t), (v, ones))
            loss = meanflow_loss(u, u_dot)
        elif base == "two_pass":
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                _, u_dot = torch.func.jvp(stock, (z, t), (v, ones))
            loss = meanflow_loss(stock_with_grad(z, t), u_dot)
        elif base == "two_pass_fused":
            with torch.no_grad():
                _, u_dot = torch.func.jvp(stock, (z, t), (v, ones))
            loss = meanflow_loss(stock_with_grad(z, t), u_dot)
        return loss

    params = [p for p in model.parameters() if p.requires_grad]
    extra = {"param_mib": sum(p.numel() * p.element_size() for p in params) / 2**20}
    if base == "pair_compiled":  # compile outside the measured steps
        start = time.perf_counter()
        step()
        extra["compile_s"] = round(time.perf_counter() - start, 1)
    results = {grads: measure(step, params, grads, device, args.repeat) | extra for grads in grads_columns}
    if base == "pair_compiled" and device.type == "cpu":
        for res in results.values():  # the peak RSS only grows: the compiling step already set it
            if "mib" in res:
                res["mib"] = None
    return results


def _describe(error: Exception) -> str:
    """``Type: first line (at file:line)`` of the innermost frame, for the table."""
    import traceback

    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" (at {os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:100] if str(error).strip() else ''}{where}"


def measure(step, params, grads: str, device, repeat: int) -> dict:
    """Peak memory growth (MiB) over one ``step()`` and its median time over ``repeat`` more."""
    import resource

    import torch

    for p in params:
        p.grad = torch.zeros_like(p) if grads == "pre" else None
    try:  # a CUDA error of an earlier asynchronous launch surfaces at a synchronize: report it too
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.max_memory_allocated()
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        step()
        first_ms = (time.perf_counter() - start) * 1e3
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"error": _describe(e)}
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for index in range(repeat):
        for p in params:
            p.grad = torch.zeros_like(p) if grads == "pre" else None
        start = time.perf_counter()
        try:
            step()
        except Exception as e:  # noqa: BLE001 - reported in the table
            return {"error": f"timed step {index + 1}: {_describe(e)}"}
        times.append((time.perf_counter() - start) * 1e3)
    return {"mib": (peak - before) / 2**20, "ms": sorted(times)[len(times) // 2] if times else first_ms}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--image-tokens", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--autocast", default="none", choices=("none", "bfloat16", "float16"),
                        help="run each step's forward under torch.autocast in this dtype, over float32 "
                             "parameters (the trainer's one-process precision); needs --dtype float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="timed steps after the measured one")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of pair_compiled")
    parser.add_argument("--allocator", choices=("both", "mmap", "default"), default="both")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "GRADS_COLUMNS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.autocast != "none" and args.dtype != "float32":
        parser.error(f"--autocast {args.autocast} runs over float32 parameters: use --dtype float32, "
                     f"not {args.dtype}")

    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1].split(","), args)))
        return

    passthrough = list(argv if argv is not None else sys.argv[1:])
    modes = args.modes.split(",")
    runs = []  # (column keys, their gradient columns, environment): one subprocess each
    if args.device != "cpu":
        runs.append((["pre", "none"], ["pre", "none"], dict(os.environ)))
    else:
        if args.allocator in ("both", "mmap"):
            mmap_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            runs += [(["pre"], ["pre"], mmap_env), (["none"], ["none"], mmap_env)]
        if args.allocator in ("both", "default"):
            default_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            runs.append((["raw"], ["none"], default_env))
    results = {}
    for mode in modes:
        for keys, grads_columns, env in runs:
            out = subprocess.run([sys.executable, __file__, *passthrough, "--one", mode, ",".join(grads_columns)],
                                 capture_output=True, text=True, env=env)
            try:
                got = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                lines = out.stderr.strip().splitlines()  # the exception's line, not CUDA's hint after it
                got = {"error": ([line for line in lines if "Error" in line] or lines or ["no output"])[-1][:120]}
            for key, grads in zip(keys, grads_columns):
                results[mode, key] = got.get(grads, got)
                print(f"  {mode} [{key}]: {results[mode, key]}", file=sys.stderr, flush=True)

    heads = args.hidden // args.head_dim
    param_mib = next((r["param_mib"] for r in results.values() if "param_mib" in r), float("nan"))
    n_img = int(round(args.image_tokens ** 0.5)) ** 2
    print(f"FLUX-shaped stack: hidden {args.hidden} ({heads} heads x {args.head_dim}), "
          f"{args.double} double + {args.single} single blocks, {n_img} image + {args.text_tokens} text tokens,"
          f" batch {args.batch}, {args.dtype}"
          f"{'' if args.autocast == 'none' else f' under {args.autocast} autocast'}, device {args.device}, "
          f"{args.threads} thread(s); "
          f"parameters {param_mib:.1f} MiB")
    titles = {"pre": "activations (grads preallocated)", "none": "full step (grads allocated in it)",
              "raw": "full step, default malloc"}
    keys = [key for run_keys, _, _ in runs for key in run_keys]
    print("Peak memory growth over one step (MiB); ratios against `plain` in the same column.\n")
    print("| step | " + " | ".join(f"{titles[k]} | ratio" for k in keys) + " | ms/step |")
    print("|---|" + "---:|---:|" * len(keys) + "---:|")
    for mode in modes:
        cells = []
        for key in keys:
            res, ref = results[mode, key], results.get(("plain", key), {}).get("mib")
            if "error" in res:
                cells += [res["error"], ""]
            elif res["mib"] is None:
                cells += ["n/a (compiled in this process)", ""]
            else:
                cells += [f"{res['mib']:.1f}", f"{res['mib'] / ref:.2f}x" if ref else ""]
        timed = results[mode, keys[-1]]
        ms = timed.get("ms")
        print(f"| {mode} | " + " | ".join(cells) + f" | {'' if ms is None else f'{ms:.0f}'} |")


if __name__ == "__main__":
    main()
