"""Per-GPU memory plan of a distillation run, sharded with FSDP2 (``meanflow plan``).

:func:`plan_memory` estimates, for a resolved :class:`~meanflow.train.config.TrainConfig` and a
number of ranks, the bytes each GPU holds at the step's peak; :func:`format_plan` renders the
plan as a markdown table. Nothing is loaded: every model is built on the ``meta`` device, so
the FLUX.1-dev plan takes a few seconds on a CPU.

**Parameter counts** are exact: the transformer (``FluxTransformer2DModel(**config)``) and the
student's (t − r) embedder (diffusers ``TimestepEmbedding(256, hidden)``) are instantiated on
``meta``; for ``model.kind="flux"`` the config is FLUX.1-dev's (:data:`FLUX_DEV_CONFIG`) unless
``transformer_config`` is given; for ``"digits"`` it is
:data:`meanflow.digits.teacher.TEACHER_CONFIG`. The frozen encoders: flux: CLIP-L text
(``CLIPTextModel``), the T5-XXL encoder (``T5EncoderModel``) and FLUX's ``AutoencoderKL``, built
from their published hyper-parameters (:data:`FLUX_ENCODER_FALLBACK_PARAMS` if transformers /
diffusers cannot build them); digits: :class:`~meanflow.digits.text.DigitsTextEncoder` with the
teacher file's own config.

**Sharding (FSDP2).** With ``gpus`` = G > 1 every trained or frozen transformer tensor (student
parameters, gradients, AdamW moments, EMA, teacher, fake network) is sharded on dim 0 over the G
ranks; a rank holds ``ceil(size(0) / G) · prod(size(1:))`` elements of each tensor (FSDP2 pads
the last shard; rank 0 holds the largest). Text encoders and VAE are replicated on every rank.
With G = 1 nothing is sharded.

**Rows** (bytes per GPU; B the per-rank batch ``data.batch_size / G``, a the compute
dtype's bytes: 2 for ``run.dtype=bfloat16``, else 4; P_s, P_t, P_f the student, teacher and fake
parameter counts, sharded as above):

- student params, grads, EMA: 4·P_s each (float32 master weights, float32 grads, float32 EMA);
- student AdamW: 2·4·P_s (exp_avg, exp_avg_sq; the 0-d ``step`` tensors are ignored); with
  ``model.student_lora_rank`` r the params are 4·(P_s + P_r) and grads, AdamW and EMA count
  only what trains, the adapters' factors P_r and the (t − r) embedder;
- teacher: P_t · (2 for bf16 runs, else 4), frozen, no optimizer;
- fake network params, grads, AdamW (only with ``method.schedule.alignment``): 4·P_f, 4·P_f,
  8·P_f (float32 master, like the student); with ``model.fake_lora_rank`` r, 4·(P_f + P_r),
  4·P_r, 8·P_r, P_r the adapters' factors (r·(in + out) per Linear of the blocks);
- text encoders + VAE: replicated, in the model dtype (flux; digits: its float32 text encoder);
- weight working copies: G = 1 with bf16 autocast: autocast's cached bf16 cast of every trained
  weight, 2·(P_s + P_f) (what trains, with adapters: frozen weights are cast anew at each use),
  alive for the whole forward/backward; G > 1: FSDP2's unsharded
  parameters of the block being computed and the prefetched next one in the compute dtype
  (2·a·P_block, P_block the largest block's parameters), and the block's unsharded float32
  gradient before its reduce-scatter (4·P_block);
- activations kept for backward (see :func:`activation_values`): B · A_kept · (1 + 1 with
  alignment, whose rollout stage keeps a second student graph in phase C);
- activations, transient: B · (recompute of one block when checkpointing + the pair-mode
  tangent's working set of one block + a no-grad teacher block), summed (an upper bound: they
  do not all coincide);
- CUDA context and allocator: :data:`CUDA_CONTEXT_BYTES` (1.5 GiB: the CUDA/cuBLAS/NCCL
  context, ~0.5–1 GiB, and the caching allocator's fragmentation).

**Activation model** (values per sample, in the compute dtype unless said). Tokens
N = N_img + N_txt: flux N_img = (resolution/16)² (the VAE's 8× down-sampling and FLUX's 2×2
packing), N_txt = 512 (T5's maximum sequence length); digits N_img = 16, N_txt = 12. d the
hidden size, H the heads. The tensors autograd keeps per block, in units of N·d:

- double block (both streams): LayerNorm input 1, its normalised output 1 and the modulated
  q/k/v input 1; q, k before RMSNorm 2 and normalised 2; attention q, k, v 3 and output 1; the
  output projection's reshaped input 1 and its output 1 (saved by the gate); second LayerNorm
  input, normalised and modulated 3; MLP hidden before GELU 4 and after 4; MLP output 1 (gate):
  ``C_DOUBLE = 26``;
- single block: LayerNorm input, normalised, modulated 3; q, k 2 + 2; attention q, k, v, output
  4; MLP hidden before GELU 4; the concatenated [attention, MLP] projection input 5; its output
  1 (gate): ``C_SINGLE = 21``;
- plus the attention's float32 log-sum-exp, H·N per block;
- outside the blocks: the embedders' inputs N_img·C_in + N_txt·D_joint and the output norm /
  projection 3·N_img·d.

A_kept = L_d·(C_DOUBLE·N·d·a + 4·H·N) + L_s·(C_SINGLE·N·d·a + 4·H·N) + top-level, or with
``model.gradient_checkpointing`` only each block's input, (L_d + L_s)·N·d·a, plus the top level;
the one block recomputed in backward is then a transient. Pair mode keeps only the primal (the
tangent runs through the fused ops outside autograd), so A_kept is the same for
``student(...)`` and ``student.forward_with_tangent(...)``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

__all__ = ["FLUX_DEV_CONFIG", "CUDA_CONTEXT_BYTES", "C_DOUBLE", "C_SINGLE", "FLUX_TEXT_TOKENS",
           "FLUX_ENCODER_FALLBACK_PARAMS", "PlanRow", "MemoryPlan", "ModelCounts", "count_model",
           "activation_values", "plan_memory", "format_plan"]

GIB = 1024 ** 3

#: FLUX.1-dev's transformer (``black-forest-labs/FLUX.1-dev/transformer/config.json``), ~11.9 B.
FLUX_DEV_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
#: FLUX's T5 maximum sequence length (FLUX.1-dev's pipeline default): the text tokens N_txt.
FLUX_TEXT_TOKENS = 512
#: Fixed allowance for the CUDA context, cuBLAS / NCCL workspaces and allocator fragmentation (bytes).
CUDA_CONTEXT_BYTES = int(1.5 * GIB)
#: Values per token and hidden channel autograd keeps per double / single block (module docstring).
C_DOUBLE = 26
C_SINGLE = 21
#: Parameter counts used only when transformers / diffusers cannot build the encoders on meta.
FLUX_ENCODER_FALLBACK_PARAMS = {"CLIP-L text encoder": 123_060_480, "T5-XXL encoder": 4_762_310_656,
                                "VAE": 83_819_683}


# --------------------------------------------------------------------------------------------
# Parameter counting on the meta device
# --------------------------------------------------------------------------------------------

@dataclass
class ModelCounts:
    """Parameter shapes of one model, built on ``meta``.

    Attributes:
        shapes: the shape of every (deduplicated) parameter.
        block_params: parameters of the largest transformer block (FSDP2's unit; 0 if none).
    """

    shapes: list[tuple[int, ...]]
    block_params: int = 0

    @property
    def params(self) -> int:
        """The parameter count."""
        return sum(math.prod(s) for s in self.shapes)

    def sharded_elements(self, gpus: int) -> int:
        """Elements rank 0 holds with dim-0 sharding over ``gpus`` ranks (FSDP2 padding)."""
        if gpus == 1:
            return self.params
        return sum(math.ceil(s[0] / gpus) * math.prod(s[1:]) if s else 1 for s in self.shapes)


def _shapes(module: torch.nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in module.parameters()]  # parameters() skips tied duplicates


def count_model(module: torch.nn.Module) -> ModelCounts:
    """:class:`ModelCounts` of a built module (any device); ``block_params`` is the largest of
    ``transformer_blocks`` / ``single_transformer_blocks`` when present."""
    blocks = [b for name in ("transformer_blocks", "single_transformer_blocks")
              for b in getattr(module, name, [])]
    return ModelCounts(_shapes(module), max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0))


def _flux_transformer_on_meta(config: dict):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def _lora_counts(transformer, rank: int, key: str) -> ModelCounts | None:
    """The adapter factors a rank-``rank`` LoRA adds to ``transformer``'s blocks (on meta; the
    transformer is left as it is); None for rank 0."""
    if not rank:
        return None
    import copy

    from meanflow.models.lora import lora_parameters
    from meanflow.train.loop import add_config_lora

    adapted = copy.deepcopy(transformer)
    add_config_lora(adapted, rank, None, key, 0)
    return ModelCounts([tuple(p.shape) for p in lora_parameters(adapted)])


def _delta_embedder_on_meta(hidden: int):
    from diffusers.models.embeddings import TimestepEmbedding

    with torch.device("meta"):
        return TimestepEmbedding(in_channels=256, time_embed_dim=hidden)


@functools.lru_cache(maxsize=1)
def _flux_encoders_on_meta_cached() -> tuple:
    return tuple(_flux_encoders_on_meta().items())


def _flux_encoders_on_meta() -> dict[str, int]:
    """Parameter counts of FLUX.1-dev's CLIP-L text encoder, T5-XXL encoder and VAE."""
    try:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    except ImportError:  # pragma: no cover - both are dependencies of the flux extra
        return dict(FLUX_ENCODER_FALLBACK_PARAMS)
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, projection_dim=768))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                            use_quant_conv=False, use_post_quant_conv=False)
    return {"CLIP-L text encoder": count_model(clip).params, "T5-XXL encoder": count_model(t5).params,
            "VAE": count_model(vae).params}


def _digits_text_encoder_on_meta(teacher: str) -> int:
    """Parameter count of the digits text encoder, with the config stored in the teacher file
    (``"builtin"``: the shipped asset); the class defaults if the file has none."""
    from meanflow.digits.teacher import TEACHER_PATH
    from meanflow.digits.text import DigitsTextEncoder

    config = {}
    path = TEACHER_PATH if teacher == "builtin" else teacher
    try:
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            config = json.loads((f.metadata() or {})["text_encoder_config"])
    except (OSError, KeyError, ValueError):
        config = {}
    with torch.device("meta"):
        return count_model(DigitsTextEncoder(**config)).params


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------

def activation_values(transformer_config: dict, image_tokens: int, text_tokens: int, *,
                      checkpointing: bool, dtype_bytes: int) -> dict[str, int]:
    """Activation bytes of ONE sample for one forward of a FLUX transformer (module docstring).

    Args:
        transformer_config: ``FluxTransformer2DModel`` keyword arguments (``num_layers``,
            ``num_single_layers``, ``attention_head_dim``, ``num_attention_heads``,
            ``in_channels``, ``joint_attention_dim``).
        image_tokens, text_tokens: N_img, N_txt.
        checkpointing: ``model.gradient_checkpointing``.
        dtype_bytes: a, bytes of the compute dtype (2 bf16, 4 float32).

    Returns:
        ``{"kept": bytes kept for backward, "block": bytes of one block's full saved set (the
        recompute / tangent / no-grad teacher working set)}``, ints, per sample.
    """
    c = transformer_config
    heads = int(c.get("num_attention_heads", 24))
    d = heads * int(c.get("attention_head_dim", 128))
    n_d, n_s = int(c.get("num_layers", 19)), int(c.get("num_single_layers", 38))
    n = image_tokens + text_tokens
    lse = 4 * heads * n
    double = C_DOUBLE * n * d * dtype_bytes + lse
    single = C_SINGLE * n * d * dtype_bytes + lse
    top = (image_tokens * int(c.get("in_channels", 64)) + text_tokens * int(c.get("joint_attention_dim", 4096))
           + 3 * image_tokens * d) * dtype_bytes
    if checkpointing:
        kept = (n_d + n_s) * n * d * dtype_bytes + top
    else:
        kept = n_d * double + n_s * single + top
    block = max(double if n_d else 0, single if n_s else 0)
    return {"kept": kept, "block": block}


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

@dataclass
class PlanRow:
    """One line of the plan: ``name``, ``bytes`` per GPU (int), the ``formula`` it came from,
    and whether it is ``sharded`` over the ranks."""

    name: str
    bytes: int
    formula: str
    sharded: bool


@dataclass
class MemoryPlan:
    """Per-GPU memory of a run (see the module docstring for every formula).

    Attributes:
        rows: the :class:`PlanRow` lines, in table order.
        gpus: ranks G.
        per_rank_batch: samples per rank, ``data.batch_size / G``.
        batch_size: ``data.batch_size``.
        kind: ``model.kind``.
        dtype: ``run.dtype``.
        checkpointing: ``model.gradient_checkpointing``.
        alignment: ``method.schedule.alignment`` (fake network and a second student graph).
        image_tokens, text_tokens: N_img, N_txt per sample.
        hidden: d, the transformer's hidden size.
        transformer_params: the teacher transformer's parameter count.
        student_params: transformer + (t − r) embedder.
        encoder_params: ``{name: parameter count}`` of the frozen encoders / VAE.
        activation_kept_per_forward: bytes one student forward keeps for backward on one rank
            (per-rank batch × A_kept), for comparison with a measurement.
    """

    rows: list[PlanRow]
    gpus: int
    per_rank_batch: int
    batch_size: int
    kind: str
    dtype: str
    checkpointing: bool
    alignment: bool
    image_tokens: int
    text_tokens: int
    hidden: int
    transformer_params: int
    student_params: int
    encoder_params: dict[str, int] = field(default_factory=dict)
    activation_kept_per_forward: int = 0

    @property
    def total_bytes(self) -> int:
        """Sum of the rows (bytes per GPU)."""
        return sum(r.bytes for r in self.rows)

    @property
    def total_gib(self) -> float:
        """:attr:`total_bytes` in GiB (2³⁰ bytes)."""
        return self.total_bytes / GIB

    def row(self, name: str) -> PlanRow:
        """The row called ``name``; ValueError naming ``name`` if there is none."""
        for r in self.rows:
            if r.name == name:
                return r
        raise ValueError(f"name: no row {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    def bytes_of(self, name: str) -> int:
        """Bytes per GPU of row ``name``, 0 if the plan has no such row (e.g. no fake network)."""
        return next((r.bytes for r in self.rows if r.name == name), 0)

    def fits(self, gpu_memory_gib: float = 80) -> bool:
        """Whether the total fits in ``gpu_memory_gib`` GiB per GPU."""
        if isinstance(gpu_memory_gib, bool) or not isinstance(gpu_memory_gib, (int, float)) \
                or not gpu_memory_gib > 0:
            raise ValueError(f"gpu_memory_gib: expected a number > 0, got {gpu_memory_gib!r}")
        return self.total_bytes <= gpu_memory_gib * GIB


STUDENT_ROWS = ("student params", "student grads", "student AdamW", "student EMA")
FAKE_ROWS = ("fake params", "fake grads", "fake AdamW")


def plan_memory(config, gpus: int, *, transformer_config: dict | None = None) -> MemoryPlan:
    """The per-GPU memory plan of ``config`` sharded with FSDP2 over ``gpus`` ranks.

    Args:
        config: a resolved :class:`~meanflow.train.config.TrainConfig`.
        gpus: G, the number of ranks (an int >= 1).
        transformer_config: ``FluxTransformer2DModel`` keyword arguments replacing the kind's
            own (flux: :data:`FLUX_DEV_CONFIG`; digits: ``TEACHER_CONFIG``), e.g. a tiny one in
            tests.

    Returns:
        a :class:`MemoryPlan` (bytes per GPU per row, totals, the inputs).

    Raises:
        ValueError naming ``gpus``, ``config`` or ``transformer_config`` on bad input.
    """
    from meanflow.train.config import TrainConfig

    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus: expected an int >= 1, got {gpus!r}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig (meanflow.train.config.load_config), "
                         f"got {type(config).__name__}")
    kind = config.model.kind
    if transformer_config is None:
        if kind == "flux":
            transformer_config = FLUX_DEV_CONFIG
        else:
            from meanflow.digits.teacher import TEACHER_CONFIG

            transformer_config = TEACHER_CONFIG
    if not isinstance(transformer_config, dict):
        raise ValueError(f"transformer_config: expected a dict of FluxTransformer2DModel arguments, "
                         f"got {type(transformer_config).__name__}")
    try:
        transformer = _flux_transformer_on_meta(dict(transformer_config))
    except TypeError as err:
        raise ValueError(f"transformer_config: not FluxTransformer2DModel arguments ({err})") from None
    hidden = transformer.inner_dim
    teacher = count_model(transformer)
    delta = count_model(_delta_embedder_on_meta(hidden))
    student = ModelCounts(teacher.shapes + delta.shapes, teacher.block_params)
    m = config.model
    align = bool(config.method.schedule.alignment)
    student_lora = _lora_counts(transformer, m.student_lora_rank, "model.student_lora_rank")
    fake_lora = _lora_counts(transformer, m.fake_lora_rank, "model.fake_lora_rank") if align else None
    del transformer

    bf16 = config.run.dtype == "bfloat16"
    a = 2 if bf16 else 4
    ckpt = bool(config.model.gradient_checkpointing)
    g = gpus
    batch = config.data.batch_size
    from meanflow.train.distributed import check_batch_split

    check_batch_split(batch, g)
    per_rank = batch // g
    shard = "" if g == 1 else f" sharded /{g}"

    t_el = teacher.sharded_elements(g)
    # What trains (gradients, AdamW, EMA): everything, or the (t − r) embedder and the adapters.
    trained = student if student_lora is None else ModelCounts(delta.shapes + student_lora.shapes)
    what = "" if student_lora is None else " (adapters and (t − r) embedder)"
    held = student.sharded_elements(g) + (0 if student_lora is None else student_lora.sharded_elements(g))
    held_what = f"{student.params:,}" if student_lora is None else \
        f"({student.params:,} with the frozen copy + {student_lora.params:,} LoRA)"
    tr_el = trained.sharded_elements(g)
    rows = [
        PlanRow("student params", 4 * held, f"4 B × {held_what} (fp32 master){shard}", g > 1),
        PlanRow("student grads", 4 * tr_el, f"4 B × {trained.params:,}{what} (fp32){shard}", g > 1),
        PlanRow("student AdamW", 8 * tr_el, f"2 × 4 B × {trained.params:,}{what} (exp_avg, exp_avg_sq){shard}",
                g > 1),
        PlanRow("student EMA", 4 * tr_el, f"4 B × {trained.params:,}{what} (fp32){shard}", g > 1),
        PlanRow("teacher", a * t_el, f"{a} B × {teacher.params:,} ({'bf16' if bf16 else 'fp32'}, frozen){shard}",
                g > 1),
    ]
    fake_params = 0  # the fake's trained parameters
    if align and fake_lora is not None:
        fake_params = fake_lora.params
        l_el = fake_lora.sharded_elements(g)
        rows += [
            PlanRow("fake params", 4 * (t_el + l_el),
                    f"4 B × ({teacher.params:,} frozen + {fake_lora.params:,} LoRA) (fp32){shard}", g > 1),
            PlanRow("fake grads", 4 * l_el, f"4 B × {fake_lora.params:,} (LoRA, fp32){shard}", g > 1),
            PlanRow("fake AdamW", 8 * l_el, f"2 × 4 B × {fake_lora.params:,} (LoRA){shard}", g > 1),
        ]
    elif align:
        fake_params = teacher.params
        rows += [
            PlanRow("fake params", 4 * t_el, f"4 B × {teacher.params:,} (fp32){shard}", g > 1),
            PlanRow("fake grads", 4 * t_el, f"4 B × {teacher.params:,} (fp32){shard}", g > 1),
            PlanRow("fake AdamW", 8 * t_el, f"2 × 4 B × {teacher.params:,}{shard}", g > 1),
        ]

    if kind == "flux":
        encoders = dict(_flux_encoders_on_meta_cached())
        enc_bytes = a
        enc_what = "bf16" if bf16 else "fp32"
    else:
        encoders = {"digits text encoder": _digits_text_encoder_on_meta(config.model.teacher)}
        enc_bytes, enc_what = 4, "fp32"
    n_enc = sum(encoders.values())
    rows.append(PlanRow("text encoders + VAE", enc_bytes * n_enc,
                        f"{enc_bytes} B × {n_enc:,} ({', '.join(encoders)}; {enc_what}, replicated)", False))

    if g == 1:
        if bf16:
            n = trained.params + fake_params
            rows.append(PlanRow("weight working copies", 2 * n,
                                f"2 B × {n:,} (autocast's cached bf16 casts of trained weights)", False))
    else:
        blk = student.block_params
        rows.append(PlanRow("weight working copies", (2 * a + 4) * blk,
                            f"(2 × {a} B + 4 B) × {blk:,} (FSDP2: 2 unsharded blocks + 1 block's fp32 grads)",
                            False))

    if kind == "flux":
        side = config.model.resolution // 16
        n_img, n_txt = side * side, FLUX_TEXT_TOKENS
    else:
        n_img, n_txt = 16, 12
    act = activation_values(transformer_config, n_img, n_txt, checkpointing=ckpt, dtype_bytes=a)
    graphs = 2 if align else 1
    kept = per_rank * act["kept"]
    rows.append(PlanRow(
        "activations (kept)", graphs * kept,
        f"{graphs} graph(s) × {per_rank} sample(s) × {act['kept']:,} B "
        + ("(block inputs: N·d·a per block + top level)" if ckpt else
           f"({C_DOUBLE}·N·d·a per double, {C_SINGLE}·N·d·a per single block + lse + top level)")
        + f"; N = {n_img} + {n_txt}, d = {hidden}", False))
    transient_blocks = 2 + (1 if ckpt else 0)  # tangent + teacher (+ recompute)
    rows.append(PlanRow(
        "activations (transient)", transient_blocks * per_rank * act["block"],
        f"{transient_blocks} block(s) × {per_rank} × {act['block']:,} B (pair-mode tangent, no-grad teacher"
        + (", checkpoint recompute)" if ckpt else ")"), False))
    rows.append(PlanRow("CUDA context + allocator", CUDA_CONTEXT_BYTES, "fixed 1.5 GiB allowance", False))

    return MemoryPlan(rows=rows, gpus=g, per_rank_batch=per_rank, batch_size=batch, kind=kind,
                      dtype=config.run.dtype, checkpointing=ckpt, alignment=align, image_tokens=n_img,
                      text_tokens=n_txt, hidden=hidden, transformer_params=teacher.params,
                      student_params=student.params, encoder_params=encoders,
                      activation_kept_per_forward=kept)


def format_plan(plan: MemoryPlan, gpu_memory_gib: float = 80) -> str:
    """A markdown table of ``plan`` (GiB per GPU, 2³⁰ bytes) with a header line and the total,
    and whether it fits in ``gpu_memory_gib`` GiB."""
    if not isinstance(plan, MemoryPlan):
        raise ValueError(f"plan: expected a MemoryPlan, got {type(plan).__name__}")
    shards = f"{plan.gpus} GPUs (FSDP2)" if plan.gpus > 1 else "1 GPU (no sharding)"
    head = (f"Memory per GPU: {plan.kind}, {shards}, batch {plan.batch_size} "
            f"({plan.per_rank_batch} per rank), {plan.dtype}, checkpointing "
            f"{'on' if plan.checkpointing else 'off'}, alignment {'on' if plan.alignment else 'off'}; "
            f"transformer {plan.transformer_params:,} params, student {plan.student_params:,}, "
            f"N = {plan.image_tokens} + {plan.text_tokens} tokens, d = {plan.hidden}")
    lines = [head, "", "| row | GiB / GPU | formula |", "|---|---:|---|"]
    for r in plan.rows:
        lines.append(f"| {r.name} | {r.bytes / GIB:.2f} | {r.formula} |")
    verdict = "fits" if plan.fits(gpu_memory_gib) else "does NOT fit"
    lines.append(f"| **total** | **{plan.total_gib:.2f}** | {verdict} in {gpu_memory_gib:g} GiB |")
    return "\n".join(lines)
