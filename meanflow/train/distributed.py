"""Training on several processes with PyTorch's FSDP2 (``fully_shard``), launched by ``torchrun``.

``torchrun --nproc-per-node N -m meanflow distill ...`` starts N copies of the command; each
finds its rank in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
:func:`init_ranks` joins the process group (NCCL on GPUs, gloo on the CPU). Without torchrun
the run is one process and nothing here is used beyond :meth:`Ranks.single`.

How the models are sharded (:func:`shard_flux`): every FLUX block of the student, the frozen
teacher and the fake velocity network is its own FSDP unit, and the rest of each model (the
embedders, the final norm and projection) is the root unit. FSDP2 hooks a module's
``forward``; the pair-mode forward calls each block's ``meanflow_pair_forward`` and the
top-level ``forward_with_tangent`` / ``velocity`` methods instead, so those are registered as
forward methods too (``register_fsdp_forward_method``): parameters are gathered before each
block and freed after it, in pair mode, in its checkpointed recompute and in backward.

How the batch is split: every rank holds the same training generator and draws every random
value for the whole global batch (:class:`~meanflow.method.draws.RowShard`), then keeps its
own rows. Gradients are averaged over ranks by FSDP's reduce-scatter, so a step on N ranks is
the step one process takes on the whole batch, to float rounding.
"""
from __future__ import annotations

import datetime
import functools
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from meanflow.method.draws import RowShard

__all__ = ["Ranks", "launched_by_torchrun", "init_ranks", "shutdown", "check_batch_split", "device_mesh",
           "mixed_precision", "shard_flux", "reshard", "full_state_dict", "silent"]


def silent(*args, **kwargs) -> None:
    """The ``log`` of ranks other than 0: prints nothing."""


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its environment names a world size)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes.

    Attributes:
        rank: 0 … size − 1; rank 0 logs and writes the run folder's files.
        size: the number of processes.
        local_rank: the rank on this machine (its GPU index).
        sharded: whether a process group is up and the models are sharded (torchrun, any size).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sharded: bool = False

    @classmethod
    def single(cls) -> "Ranks":
        """One process, no process group."""
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int, generator: torch.Generator) -> RowShard | torch.Generator:
        """What the method's draws take for a global batch of ``batch``: the generator itself on one
        process, else this rank's :class:`RowShard` of it."""
        if self.size == 1:
            return generator
        return RowShard(generator, self.rank * (batch // self.size), batch // self.size, batch)

    def mean(self, *values: float) -> list[float]:
        """The averages of floats over ranks, in one collective (the values themselves on one
        process)."""
        if not self.sharded:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_cpu_group())
        return [float(x) / self.size for x in t]

    def all(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        if not self.sharded:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_cpu_group())
        return bool(t)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.sharded:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=_cpu_group())
        return box[0]

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items split over the ranks (the last shares may
        be shorter or empty)."""
        size = -(-n // self.size)
        return slice(min(n, self.rank * size), min(n, (self.rank + 1) * size))

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` in rank order on rank 0 (None on the others)."""
        if not self.sharded:
            return [obj]
        out = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0, group=_cpu_group())
        return out

    def barrier(self, timeout_hours: float | None = None) -> None:
        """Waits for every rank. ``timeout_hours`` for waits on long work of one rank (a data
        cache rank 0 builds); a rank that never arrives is named in the error."""
        if not self.sharded:
            return
        if timeout_hours is None:
            dist.barrier(group=_cpu_group())
        else:
            dist.monitored_barrier(group=_cpu_group(), timeout=datetime.timedelta(hours=timeout_hours))


# A gloo group for the small host-side collectives (flags, losses, names); NCCL is kept for the
# tensors FSDP moves. Made by init_ranks, on every rank at the same point.
_CPU_GROUP = None


def check_batch_split(batch_size: int, ranks: int) -> None:
    """ConfigError naming ``data.batch_size`` unless the global batch splits evenly over the
    ranks (every rank takes an equal share, so the ranks' average is the batch mean)."""
    from meanflow.train.config import ConfigError

    if batch_size % ranks:
        raise ConfigError(f"data.batch_size: {batch_size} does not split evenly over {ranks} ranks")


def _cpu_group():
    return _CPU_GROUP


def init_ranks(device: torch.device, timeout_minutes: float = 30.0) -> tuple[Ranks, torch.device]:
    """Joins the process group when started by torchrun; returns (ranks, this rank's device).

    ``device`` is the resolved ``run.device``: CUDA gives each rank the GPU of its local rank
    and the NCCL backend; the CPU gives gloo. Without torchrun: (``Ranks.single()``, device).
    """
    if not launched_by_torchrun():
        return Ranks.single(), device
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"run.device: local rank {local_rank} but only {torch.cuda.device_count()} GPUs "
                             "are visible; start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"run.device: multi-process training supports cuda and cpu, not {device.type!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    global _CPU_GROUP
    _CPU_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return Ranks(rank=rank, size=size, local_rank=local_rank, sharded=True), device


def shutdown() -> None:
    """Leaves the process group (no-op without one)."""
    global _CPU_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None


def mixed_precision(dtype_name: str):
    """FSDP2's policy for ``run.dtype``: bf16 parameters in the blocks' compute with float32
    gradient reduction for ``"bfloat16"`` (the float32 master weights stay sharded); None (no
    casting) for ``"float32"``. Block inputs are not cast: autocast and pair mode's explicit
    casts choose each op's dtype as in one process, and the RoPE tables stay float32."""
    if dtype_name != "bfloat16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def device_mesh(device: torch.device, ranks: Ranks):
    """The 1-d device mesh of all ranks on ``device``'s type (FSDP2 shards over it)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (ranks.size,))


def shard_flux(model: nn.Module, mesh, methods: tuple[str, ...] = (), mp_policy=None,
               frozen: bool = False) -> nn.Module:
    """Shards a FLUX model in place with ``fully_shard`` over ``mesh`` (:func:`device_mesh`;
    FSDP2 moves each unit's shard to the mesh's device): one unit per block (with its pair form
    registered as a forward method where it has one), then the rest as the root unit with
    ``methods`` (e.g. ``("forward_with_tangent",)``) registered. ``model.transformer`` is the
    ``FluxTransformer2DModel``. The root unit keeps float32 parameters (the time path runs in
    float32; autocast casts the embedders), the blocks take ``mp_policy``. ``frozen`` (a model
    only ever run without gradient, the teacher): the root unit is freed after each call of
    ``methods``, as FSDP2 would otherwise keep it gathered for a backward that never comes.
    Returns ``model``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from meanflow.models.flux_student import PAIR_FORWARD

    # FSDP2 warns when a unit returns a view (FLUX's single blocks split their output into text
    # and image tokens; the student returns a reshaped projection), because an in-place op on
    # such a view would skip its backward hook. Nothing here modifies block or model outputs in
    # place, and the tests check sharded gradients and losses against one process.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    transformer = model.transformer
    block_kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        fully_shard(block, **block_kwargs)
        if hasattr(block, PAIR_FORWARD):
            register_fsdp_forward_method(block, PAIR_FORWARD)
    root_kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(
        reduce_dtype=mp_policy.reduce_dtype, cast_forward_inputs=False)}
    fully_shard(model, **root_kwargs)
    for name in methods:
        register_fsdp_forward_method(model, name)
        if frozen:
            _reshard_after(model, name)
    return model


def _reshard_after(module, name: str) -> None:
    method = getattr(module, name)

    @functools.wraps(method)
    def call_then_reshard(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        finally:
            module.reshard()

    setattr(module, name, call_then_reshard)


def reshard(model: nn.Module) -> None:
    """Frees the gathered parameters of every FSDP unit in ``model`` (no-op unsharded). FSDP2
    keeps the root unit gathered after a forward without backward (sampling, evaluation), and
    its parameters are then plain tensors rather than the DTensor shards the EMA and the
    optimizer hold."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model: nn.Module, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The whole ``state_dict`` of a (possibly sharded) model as CPU tensors on rank 0 ({} on
    the other ranks). Every rank must call it."""
    if not ranks.sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
