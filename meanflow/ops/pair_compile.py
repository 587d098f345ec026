"""The ``torch.compile`` route of the pair ops: each fused pass as an opaque custom op.

Dynamo cannot trace an ``autograd.Function`` that defines ``jvp``, nor the Triton launchers
behind it, so while compiling ``apply_pair`` calls two ``torch.library`` custom ops instead:

- ``meanflow::pair_forward(name, options, tensors, present) -> [y, y_dot, *extras]``: the op's
  fused pass (``PairOp.forward``) over its inputs and tangents, the absent ones left out of
  ``tensors`` and marked in ``present``. Its fake implementation is the op's plain-torch
  reference on fake tensors (``PairOp.reference``; the op's own pass where it has none), so
  shapes and dtypes come from the same code that is the test oracle;
- ``meanflow::pair_backward(name, options, inputs, y, extras, grad_y, needs) -> grads``: the
  op's backward, one gradient per input that needs one, registered as the forward's autograd
  formula.

A compiled graph then holds the kernels as single nodes, with no graph break, and inductor fuses
the code around them. ``name`` is the ``PairOp``'s name (ops register themselves here) and
``options`` its options tuple written as a Python literal: both are constants of the graph.

Outputs are always fresh and contiguous, in the real and the fake implementation alike, so the
strides the compiler plans with are the ones it gets. Forward AD has no place here (Dynamo does
not trace it through a Function), so ``apply_pair`` takes this route only where none is active.
"""
from __future__ import annotations

import ast
import functools
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from meanflow.ops.pair import PairOp

Tensor = torch.Tensor

_OPS: dict[str, "PairOp"] = {}


def register(op: "PairOp") -> None:
    """Makes ``op`` callable through the custom ops by its name (each name once)."""
    known = _OPS.setdefault(op.name, op)
    if known is not op:
        raise ValueError(f"a PairOp named {op.name!r} is already registered: op names must be unique")


def encode_options(options: tuple) -> str:
    """``options`` as the literal the custom ops take; refuses what a literal cannot carry."""
    if not all(o is None or isinstance(o, (bool, int, float, str)) for o in options):
        raise ValueError(f"options {options!r} must be numbers, bools, strings or None to be compiled")
    return repr(tuple(options))


@functools.lru_cache(maxsize=None)
def decode_options(text: str) -> tuple:
    return ast.literal_eval(text)


def _fresh(t: Tensor, inputs: list[Optional[Tensor]]) -> Tensor:
    """t contiguous and sharing no storage with ``inputs`` (custom ops may not return aliases)."""
    t = t.contiguous()
    storage = t.untyped_storage().data_ptr()
    if t.numel() and any(i is not None and i.numel() and i.untyped_storage().data_ptr() == storage
                         for i in inputs):
        t = t.clone()
    return t


def _outputs(y: Tensor, y_dot: Tensor | None, extras: tuple) -> list[Tensor]:
    return [y, y.new_empty(0) if y_dot is None else y_dot, *extras]  # a custom op returns tensors only


def _pack(tensors) -> tuple[list[Tensor], list[bool]]:
    """The tensors among ``tensors`` and where they were: custom-op autograd tracks only
    ``Tensor[]`` arguments, not ``Tensor?[]``."""
    return [t for t in tensors if t is not None], [t is not None for t in tensors]


def _unpack(tensors: list[Tensor], present: list[bool]) -> tuple[Tensor | None, ...]:
    given = iter(tensors)
    return tuple(next(given) if p else None for p in present)


def _split(tensors: tuple) -> tuple[tuple, tuple]:
    """(inputs, tangents) of the unpacked (*inputs, *tangents)."""
    n = len(tensors) // 2
    return tensors[:n], tensors[n:]


@torch.library.custom_op("meanflow::pair_forward", mutates_args=())
def pair_forward(name: str, options: str, tensors: list[Tensor], present: list[bool]) -> list[Tensor]:
    """[y, y_dot (empty where the pass gives none), *extras] of the op ``name``'s fused pass over
    (*inputs, *tangents), given as the present tensors and where they are (``_pack``)."""
    inputs, tangents = _split(_unpack(tensors, present))
    y, y_dot, extras = _OPS[name].forward(inputs, tangents, decode_options(options))
    return [_fresh(t, tensors) for t in _outputs(y, y_dot, extras)]


@pair_forward.register_fake
def _pair_forward_fake(name, options, tensors, present):
    op = _OPS[name]
    inputs, tangents = _split(_unpack(tensors, present))
    options = decode_options(options)
    if op.reference is not None:
        options = op.reference(options)
    y, y_dot, extras = op.forward(inputs, tangents, options)
    return [t.clone(memory_format=torch.contiguous_format) for t in _outputs(y, y_dot, extras)]


@torch.library.custom_op("meanflow::pair_backward", mutates_args=())
def pair_backward(name: str, options: str, inputs: list[Optional[Tensor]], y: Optional[Tensor],
                  extras: list[Tensor], grad_y: Tensor, needs: list[bool]) -> list[Tensor]:
    """The gradients of the op ``name``'s inputs, one per input whose ``needs`` is True."""
    op = _OPS[name]
    grads = op.backward(tuple(inputs), y, tuple(extras), decode_options(options), grad_y, tuple(needs))
    return [_fresh(torch.zeros_like(x) if g is None else g, [*inputs, y, *extras, grad_y])
            for x, g, need in zip(inputs, grads, needs) if need]


@pair_backward.register_fake
def _pair_backward_fake(name, options, inputs, y, extras, grad_y, needs):
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x, need in zip(inputs, needs) if need]


def _setup_context(ctx, inputs, output):
    name, options, tensors, present = inputs
    op = _OPS[name]
    op_inputs, _ = _split(_unpack(tensors, present))
    ctx.name, ctx.options, ctx.n_inputs, ctx.present = name, options, len(op_inputs), present
    ctx.needs = [x is not None and x.requires_grad for x in op_inputs]
    ctx.save_for_backward(*op_inputs, output[0] if op.save_output else None, *output[2:])


def _backward(ctx, grads):
    saved, n = ctx.saved_tensors, ctx.n_inputs
    given = iter(pair_backward(ctx.name, ctx.options, list(saved[:n]), saved[n], list(saved[n + 1:]),
                               grads[0], ctx.needs))
    # One gradient per packed tensor: the inputs' where needed, None for the tangents.
    per_slot = [next(given) if need else None for need in ctx.needs] + [None] * n
    return None, None, [g for g, p in zip(per_slot, ctx.present) if p], None


pair_forward.register_autograd(_backward, setup_context=_setup_context)


def apply_compiled(op: "PairOp", inputs, tangents, options: tuple) -> tuple[Tensor, Tensor | None]:
    """``apply_pair`` while compiling: (y, y_dot), y_dot detached, None where the fused pass gave
    none (``pair_forward`` returns it empty there)."""
    y, y_dot, *_ = pair_forward(op.name, encode_options(options), *_pack((*inputs, *tangents)))
    return y, (y_dot.detach() if y_dot.shape == y.shape else None)
