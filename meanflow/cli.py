"""The ``meanflow`` command.

    meanflow                    # = meanflow demo
    meanflow demo               # jvp_attention under torch.func.jvp against math SDPA, on this machine
    meanflow distill            # the digits preset: distill the shipped teacher, report in runs/digits
    meanflow distill --preset flux-dev --set run.out_dir=runs/flux     # FLUX.1-dev on a GPU
    meanflow distill --resume --out runs/digits                         # continue a run
    torchrun --nproc-per-node 8 -m meanflow distill --preset flux-dev  # FSDP2 over 8 GPUs
    meanflow sample --run runs/digits --prompt "a handwritten digit three" --steps 1 2 4
    meanflow eval --run runs/digits --output runs/digits/eval-again
    meanflow generate-data --num 2048 --output data/teacher_latents.safetensors
    meanflow plan --preset flux-dev --gpus 8   # estimated per-GPU memory (exit 1 if it does not fit)
    meanflow presets
    meanflow bench                            # jvp_attention beside SDPA on this machine: TFLOP/s, memory

``demo`` runs the MeanFlow pattern (output and tangent in one pass, then a backward through
the output) at a small size on the backend ``MEANFLOW_BACKEND`` selects, checks it against
PyTorch's math SDPA in float64, and prints the errors and the time of both.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _meanflow_step(attention, q, k, v, tangents):
    """out, tan = jvp(attention); loss = ‖out − sg(tan)‖²; backward. Returns (out, tan, grads)."""
    primals = tuple(t.detach().requires_grad_() for t in (q, k, v))
    out, tan = torch.func.jvp(attention, primals, tangents)
    ((out - tan.detach()) ** 2).mean().backward()
    return out, tan, [p.grad for p in primals]


def demo(args: argparse.Namespace) -> int:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from meanflow.ops import jvp_attention
    from meanflow.ops.dispatch import resolve_backend
    from meanflow.testing import relative_error

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    shape_q = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape_q, device=device, dtype=dtype) for _ in range(3))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    backend = resolve_backend(device)
    print(f"jvp_attention demo: B={args.batch} H={args.heads} N={args.tokens} d={args.head_dim} "
          f"{str(dtype).removeprefix('torch.')} on {device.type}, backend {backend}")

    def math_sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    def timed(fn, *inputs):
        fn(*inputs)  # warm-up (compilation, autotuning)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    ours, ours_s = timed(lambda *x: _meanflow_step(jvp_attention, *x), q, k, v, tangents)
    math, math_s = timed(lambda *x: _meanflow_step(math_sdpa, *x), q, k, v, tangents)
    oracle = _meanflow_step(math_sdpa, q.double(), k.double(), v.double(), tuple(t.double() for t in tangents))
    names = ("output", "tangent", "grad q", "grad k", "grad v")
    worst = 0.0
    for name, a, b in zip(names, (ours[0], ours[1], *ours[2]), (oracle[0], oracle[1], *oracle[2])):
        err = relative_error(a, b)
        worst = max(worst, err)
        print(f"  {name:8s} relative error vs float64 math SDPA: {err:.2e}")
    print(f"  tangent has grad_fn: {ours[1].grad_fn is not None} (math SDPA's: {math[1].grad_fn is not None})")
    print(f"  MeanFlow step (jvp + backward): jvp_attention {ours_s * 1e3:.1f} ms, "
          f"math SDPA {math_s * 1e3:.1f} ms")
    limit = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = worst <= limit
    print("OK" if ok else f"FAILED: error {worst:.2e} > {limit:.0e}")
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from meanflow import benchmark

    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cuda", "cpu"):
            raise ValueError(f"--device: expected cuda or cpu (cuda:N), got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device: {args.device!r}, but torch.cuda.is_available() is False")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {args.device!r}, but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s) (cuda:0 ...)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json: no folder for {args.json!r}")  # before minutes of timing, not after
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    tokens = args.tokens or ([1024, 4608] if cuda else [256])
    calls, rounds = args.calls or (10 if cuda else 1), args.rounds or (10 if cuda else 3)
    if args.memory_budget_gib is not None:
        budget = args.memory_budget_gib * 2**30
    else:  # what is free now, less a margin for the inputs and the allocator
        budget = 0.8 * torch.cuda.mem_get_info(device)[0] if cuda else 4 * 2**30
    print(benchmark.machine_line(device))
    print(f"{calls} calls per synchronisation, median of {rounds} rounds; baselines: math SDPA for the "
          "cases with a tangent, SDPA's own backend choice otherwise\n")
    rows = []
    for n in tokens:
        shape = benchmark.Shape(args.batch, args.heads, n, args.head_dim, dtype, device)
        for case in args.cases:
            rows += benchmark.run_case(case, shape, calls=calls, rounds=rounds, memory_budget=budget)
    print(benchmark.format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": benchmark.machine_line(device), "calls": calls, "rounds": rounds,
                       "rows": benchmark.rows_as_dicts(rows)}, f, indent=1)
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a clean usage error otherwise, never a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


DEFAULT_PRESET = "digits"


def _config_args(parser: argparse.ArgumentParser, resume: bool = False) -> None:
    parser.add_argument("--preset", help=f"named preset (default {DEFAULT_PRESET}"
                        + ("; with --resume, the run's config.yaml" if resume else "")
                        + "; `meanflow presets` lists them)")
    parser.add_argument("--config", metavar="FILE", help="a YAML file over the preset")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one key, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--out", metavar="DIR", help="the run folder (= --set run.out_dir=DIR)")


def _load(args) -> "TrainConfig":
    from meanflow.train.config import ConfigError, load_config
    from meanflow.train.structured import parse_overrides, require_section

    overrides = list(args.overrides)
    # --out is a folder, taken as it is (through --set it would be read as YAML: "a #2" is "a").
    values = {"run": {"out_dir": args.out}} if getattr(args, "out", None) else {}
    if args.preset is None and args.config is None and getattr(args, "resume", False):
        # --resume with neither: the run's own config.yaml is the base (the --set keys go on top,
        # and the run checks that only run.*, sample.* and eval.* changed). The folder comes
        # from --out or --set run.out_dir alone: the other keys are checked against the run's
        # config, not the default preset's.
        run_section = parse_overrides(overrides).get("run")
        run_section = {} if run_section is None else require_section(run_section, "run")
        out_dir = args.out or run_section.get("out_dir") or load_config(DEFAULT_PRESET).run.out_dir
        if not isinstance(out_dir, str):
            raise ConfigError("run.out_dir", f"expected a folder, got {out_dir!r}")
        recorded = os.path.join(out_dir, "config.yaml")
        if not os.path.isfile(recorded):
            raise ConfigError("run.out_dir", f"--resume without --preset or --config continues from the run's "
                                             f"config.yaml, and {out_dir!r} has none")
        return load_config(None, recorded, overrides, {"run": {"out_dir": out_dir}})
    return load_config(DEFAULT_PRESET if args.preset is None else args.preset, args.config, overrides, values)


def _run_config(run_dir: str, overrides=()) -> "TrainConfig":
    """The resolved config a run folder recorded, with ``overrides`` (``--set``) on top."""
    from meanflow.train.config import ConfigError, load_config

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"--run: {run_dir!r} has no config.yaml (not a meanflow distill run folder)")
    return load_config(None, path, list(overrides))


def cmd_distill(args) -> int:
    """Under torchrun every rank runs this; an exception on any rank is written where torchrun
    reports it (``record``), and torchrun then stops the other ranks."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from meanflow.train.distill import distill
    from meanflow.train.distributed import shutdown

    @record
    def run() -> int:
        try:
            return distill(_load(args), resume=args.resume)
        finally:
            shutdown()

    return run()


def cmd_plan(args) -> int:
    from meanflow.train.plan import format_plan, plan_memory

    plan = plan_memory(_load(args), args.gpus)
    print(format_plan(plan, args.gpu_memory))
    return 0 if plan.fits(args.gpu_memory) else 1


def cmd_presets(args) -> int:
    from meanflow.train.config import list_presets

    print("\n".join(list_presets()))
    return 0


def _world_and_student(args):
    """(config, world, student) from --run (a run folder) or --student + the config options."""
    from meanflow.models.flux_student import FluxStudent
    from meanflow.train.world import make_world

    if args.run:
        from meanflow.train.config import ConfigError

        for option in ("preset", "config", "out"):  # the run's config.yaml is the config, its folder the run
            if getattr(args, option, None):
                raise ConfigError(f"--{option}: not used with --run (the run's config.yaml is the config; "
                                  "change keys with --set)")
        config = _run_config(args.run, args.overrides)
        student_dir = args.student or os.path.join(args.run, "student")
    else:
        config = _load(args)
        student_dir = args.student
    world = make_world(config, training=False)
    student = None
    if student_dir:
        if not os.path.isdir(student_dir):
            raise ValueError(f"--student: no such folder {student_dir!r}")
        student = FluxStudent.from_pretrained(student_dir).to(world.device).eval()
    return config, world, student


def cmd_sample(args) -> int:
    from meanflow.train.loop import sample_student
    from meanflow.train.world import read_prompt_file

    config, world, student = _world_and_student(args)
    if student is None:
        raise ValueError("--student: give a student folder (or --run with a finished run)")
    prompts = list(args.prompt) + (read_prompt_file(args.prompts) if args.prompts else [])
    if not prompts:
        prompts = world.eval_prompts()
    os.makedirs(args.output, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    for steps in args.steps:
        images = []
        for index, text in enumerate(prompts):
            noise = torch.randn((args.num, *world.latent_shape), generator=generator)
            images.append(world.decode(sample_student(student, world, [text] * args.num, steps, noise,
                                                      config.sample.shift)))
        path = os.path.join(args.output, f"samples-{steps}step.png")
        world.save_grid(torch.cat(images), path, nrow=args.num)
        print(f"{path}: {len(prompts)} prompts (one per row) x {args.num}, {steps} step(s)")
    return 0


def _check_eval_output(output: str) -> None:
    """Refuses an --output that would overwrite a run's files or that cannot be a folder, before
    the (minutes of) evaluation rather than after it."""
    from meanflow.train.distill import CHECKPOINTS, RUN_FILES

    real = os.path.realpath(output)
    if any(os.path.exists(os.path.join(real, name)) for name in ("config.yaml", CHECKPOINTS)):
        # A run's eval.json is what its report.md was built from: keep it.
        raise ValueError(f"--output: {output!r} holds a run (config.yaml or {CHECKPOINTS}/); "
                         "choose another folder, e.g. a new one inside the run")
    # Nor inside the run's own folders, at any depth: the next export replaces student/ whole,
    # checkpoint rotation deletes checkpoints/step-*, and so on.
    folder = real
    while os.path.dirname(folder) != folder:
        parent, name = os.path.split(folder)
        if name in (CHECKPOINTS, *RUN_FILES) and os.path.exists(os.path.join(parent, "config.yaml")):
            raise ValueError(f"--output: {output!r} is inside the run's own {name!r}; "
                             "choose a new folder inside the run")
        folder = parent
    existing = real  # the folder itself, or the nearest parent that exists (the writes create the rest)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output: {existing!r} is a file, not a folder")


def cmd_eval(args) -> int:
    import json

    from meanflow.eval.evaluate import evaluate, json_ready, markdown_table
    from meanflow.train.atomic import atomic_write_text

    if args.output:
        _check_eval_output(args.output)
    config, world, student = _world_and_student(args)
    if args.teacher_steps is not None:
        config.eval.teacher_steps = tuple(args.teacher_steps)
    if args.student_steps is not None:
        config.eval.student_steps = tuple(args.student_steps)
    if student is None:
        config.eval.student_steps = ()
    config.check_eval_sample_count()  # also where the run did not evaluate at its end
    result = evaluate(world, student, config)
    table = markdown_table(result)
    print(table)
    if args.output:  # atomically: an interrupted write leaves the old file or none, never half of one
        files = {"eval.json": json.dumps(json_ready(result), indent=2), "eval.md": table + "\n"}
        for name, text in files.items():
            atomic_write_text(os.path.join(args.output, name), text)
    return 0


def cmd_generate_data(args) -> int:
    from meanflow.train.data import save_latents, teacher_latents, teacher_recipe
    from meanflow.train.world import make_world, read_prompt_file

    config = _load(args)
    world = make_world(config, training=False)
    prompts = read_prompt_file(args.prompts) if args.prompts else world.train_prompts()
    steps = args.steps or max(config.eval.teacher_steps)
    latents, chosen = teacher_latents(world, prompts, args.num, steps, config.method.guidance,
                                      shift=config.sample.shift, seed=args.seed, batch_size=config.eval.batch_size)
    recipe = teacher_recipe(config, prompts, args.num, steps, args.seed)
    path = save_latents(args.output, latents, chosen, dict(recipe, writer="generate-data"))
    print(f"{path}: {latents.shape[0]} latents {tuple(latents.shape[1:])} ({steps} teacher steps); train on "
          f"them with --set data.source=teacher --set data.latents_cache={os.path.dirname(os.path.abspath(path))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meanflow", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    demo_parser = commands.add_parser("demo", help="jvp_attention under torch.func.jvp vs math SDPA")
    for name, default in (("batch", 1), ("heads", 4), ("tokens", 1024), ("head-dim", 64), ("seed", 0)):
        demo_parser.add_argument(f"--{name}", type=int, default=default)
    demo_parser.set_defaults(func=demo)

    p = commands.add_parser("bench", help="time jvp_attention beside SDPA on this machine (TFLOP/s, memory)")
    p.add_argument("--tokens", type=_positive_int, nargs="+",
                   help="sequence lengths N (default: 1024 4608 on a GPU, 256 on a CPU)")
    p.add_argument("--heads", type=_positive_int, default=24)
    p.add_argument("--head-dim", type=_positive_int, default=128)
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--cases", nargs="+", choices=("fwd_jvp", "fwd_jvp_bwd", "fwd", "bwd"),
                   default=["fwd_jvp", "fwd_jvp_bwd", "fwd", "bwd"])
    p.add_argument("--calls", type=_positive_int,
                   help="calls per synchronisation (default 10 on a GPU, 1 on a CPU)")
    p.add_argument("--rounds", type=_positive_int, help="timed rounds (default 10 on a GPU, 3 on a CPU)")
    p.add_argument("--memory-budget-gib", type=_positive_float, metavar="GIB",
                   help="skip math SDPA where its N×N buffers exceed this "
                   "(default: 80%% of free GPU memory; 4 on a CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench)

    p = commands.add_parser("distill", help="distill a teacher into a few-step student (default preset: digits)")
    _config_args(p, resume=True)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder, from its config.yaml (--set may change run.*, "
                   "sample.* and eval.* keys)")
    p.set_defaults(func=cmd_distill)

    p = commands.add_parser("plan", help="estimated per-GPU memory of a run sharded over N GPUs (FSDP2)")
    _config_args(p)
    p.add_argument("--gpus", type=_positive_int, default=1)
    p.add_argument("--gpu-memory", type=_positive_float, default=80.0, metavar="GIB",
                   help="memory per GPU (default 80)")
    p.set_defaults(func=cmd_plan)

    p = commands.add_parser("presets", help="list the named presets")
    p.set_defaults(func=cmd_presets)

    for name, helptext in (("sample", "PNG samples of a student with K steps (e.g. 1, 2, 4)"),
                           ("eval", "few-step metrics of a student and its teacher (JSON and markdown)")):
        p = commands.add_parser(name, help=helptext)
        _config_args(p)
        p.add_argument("--run", metavar="DIR", help="a finished run folder: its config and student/")
        p.add_argument("--student", metavar="DIR", help="a student folder (FluxStudent.save_pretrained)")
        if name == "sample":
            p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
            p.add_argument("--prompts", metavar="FILE", help="a prompt file, one per line")
            p.add_argument("--steps", type=_positive_int, nargs="+", default=[1, 2, 4],
                           help="the student's step counts, one grid each (default 1 2 4)")
            p.add_argument("--num", type=_positive_int, default=8, help="images per prompt")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--output", default="samples", metavar="DIR")
            p.set_defaults(func=cmd_sample)
        else:
            p.add_argument("--teacher-steps", type=_positive_int, nargs="*")
            p.add_argument("--student-steps", type=_positive_int, nargs="*")
            p.add_argument("--output", metavar="DIR", help="write eval.json and eval.md there")
            p.set_defaults(func=cmd_eval)

    p = commands.add_parser("generate-data", help="teacher latents from prompts, cached for data.source=teacher")
    _config_args(p)
    p.add_argument("--prompts", metavar="FILE", help="prompt file (default: the world's training prompts)")
    p.add_argument("--num", type=_positive_int, default=2048)
    p.add_argument("--steps", type=_positive_int, help="teacher Euler steps (default: the largest eval.teacher_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, metavar="FILE")
    p.set_defaults(func=cmd_generate_data)

    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    try:
        return args.func(args)
    except ValueError as error:  # ConfigError included: a clear message, nothing touched
        print(f"meanflow: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
