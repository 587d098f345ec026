"""The mechanism every fused JVP op shares: (primal, tangent) computed together, outside autograd.

An op is described by a ``PairOp``: how to compute (y, ẏ, saved) from inputs and tangents in
one pass (a fused kernel, or plain torch), and how to compute the input gradients of y from
what was saved. ``apply_pair`` turns it into an autograd op usable three ways:

- pair form: ``y, y_dot = apply_pair(op, inputs, tangents, options)``: y differentiable, y_dot
  detached (no ``grad_fn``), for the pair-mode forward of a network. Under forward AD around the
  call (``torch.func.jvp``, a dual level), y also gets the forward-AD tangent of its inputs: a
  second fused pass over those tangents, unpacked like the forward-AD form's;
- forward AD: ``apply_pair(op, inputs, None, options)`` unpacks the tangents of dual inputs
  (``torch.func.jvp`` or ``torch.autograd.forward_ad``), hands them to the same fused pass as
  extra inputs, and the Function's ``jvp`` returns the tangent it computed;
- plain autograd, when no input has a tangent: the fused pass without tangents.

When nothing needs a gradient (grad mode off, or no input requires grad) and no tangent must
reach forward AD, the fused pass runs alone, with no autograd node (``needs_autograd``).

The tangent is never recorded for backward: gradients reach the inputs through y only, also
where the given tangents carry autograd history (as forward-AD tangents do after any layer with
trainable parameters); a torch.func.grad / vjp around torch.func.jvp is warned that the tangent
carries no gradient. Tangents that are absent or forward AD's zero tensors are passed as None,
so they cost no work. Forward-AD tangents are always unpacked here and handed to the fused pass
as plain inputs: inside a torch.func transform the Function's ``jvp`` sees wrapped tensors, which
Triton kernels cannot read.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from meanflow.ops import pair_compile
from meanflow.ops._checks import check_tangent

try:  # functorch internals, used only to refuse what would otherwise be silently wrong
    from torch._C._functorch import TransformType, is_functorch_wrapped_tensor
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # pragma: no cover - older or stripped builds
    retrieve_all_functorch_interpreters = None

Tensor = torch.Tensor


def has_dual_tangent(*tensors: Tensor | None) -> bool:
    """Whether a forward-AD dual level is open and any tensor carries a tangent in it."""
    return fwAD._current_level >= 0 and any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def functorch_wrapped(*tensors: Tensor | None) -> bool:
    """Whether any tensor is a torch.func wrapper (inside torch.func.grad / vjp), which Triton
    kernels cannot read."""
    return retrieve_all_functorch_interpreters is not None and any(
        t is not None and is_functorch_wrapped_tensor(t) for t in tensors)


@dataclass(frozen=True)
class PairOp:
    """One fused JVP op.

    Attributes:
        name: the op's name stem, for messages.
        forward: ``(inputs, tangents, options) -> (y, y_dot or None, extras)``. inputs: a tuple of
            tensors, some possibly None (an absent bias or mask); tangents: the same length, None
            where absent; options: a tuple of non-tensor settings; extras: a tuple of new tensors
            the backward needs besides the inputs (the log-sum-exp of attention, say).
        backward: ``(inputs, y, extras, options, grad_y, needs_input_grad) -> grads``, one per
            input (None where not needed). y is None unless ``save_output``.
        save_output: whether the backward reads y.
        raw_tensors: ``options -> bool``: whether ``forward``/``backward`` launch kernels that
            need plain tensors (Triton) for these options. Where torch.func's wrapped tensors
            reach them (the backward inside torch.func.grad / vjp; the recomputed tangent under
            torch.func.jvp around those), the op runs ``reference(options)`` instead, or, without
            one, is refused with a clear error.
        reference: ``options -> options`` that run the op's plain-torch reference, which reads
            wrapped tensors; None where the op has no other implementation.
        differentiable_backward: whether the backward can itself be differentiated: in reverse
            mode (torch.func.grad around torch.func.grad / vjp) and in forward mode
            (torch.func.jvp or a dual level around a backward, as in a Hessian-vector product).
            False where the backward reads extras, which carry neither graph nor tangent, or
            runs without a graph: the op then refuses those nestings.
        input_names: the inputs' argument names, for messages ("input 0", ... when empty).
        prepare: applied to every forward-AD tangent unpacked from an input, as the op's entry
            point applies it to the inputs themselves (a layout fix the kernels need), or None.
    """

    name: str
    forward: Callable[..., tuple[Tensor, Tensor | None, tuple]]
    backward: Callable[..., tuple]
    save_output: bool = False
    raw_tensors: Callable[[tuple], bool] = lambda options: False
    reference: Callable[[tuple], tuple] | None = None
    differentiable_backward: bool = True
    input_names: tuple[str, ...] = ()
    prepare: Callable[[Tensor | None], Tensor | None] | None = None

    def __post_init__(self):
        pair_compile.register(self)  # the torch.compile route finds the op by its name

    def input_name(self, i: int) -> str:
        return self.input_names[i] if i < len(self.input_names) else f"input {i}"

    def options_for(self, options: tuple, *tensors: Tensor | None, where: str) -> tuple:
        """``options``, or the reference's where torch.func wrappers among ``tensors`` would reach
        kernels that need plain tensors, or where ``tensors`` carry forward-AD tangents that the
        kernels would drop (``where``: which pass, for the error)."""
        if not (self.raw_tensors(options) and (functorch_wrapped(*tensors) or has_dual_tangent(*tensors))):
            return options
        if self.reference is None:
            raise ValueError(f"{where} over {self.name}'s Triton kernels is not supported (they need "
                             "plain tensors): use .backward() or torch.autograd.grad, or "
                             "MEANFLOW_BACKEND=reference")
        return self.reference(options)


# The ops of meanflow.ops keep their backend ('triton' or 'reference') last in their options.
def runs_kernels(options: tuple) -> bool:
    """PairOp.raw_tensors of the package's ops: whether these options launch Triton kernels."""
    return options[-1] == "triton"


def on_reference(options: tuple) -> tuple:
    """PairOp.reference of the package's ops: the same options on the plain-torch backend."""
    return (*options[:-1], "reference")


KERNEL_OP = dict(raw_tensors=runs_kernels, reference=on_reference)  # PairOp settings of those ops


class PairFunction(torch.autograd.Function):
    """apply(op, options, keep_for_jvp, n_inputs, *inputs, *tangents[, *outer]) -> (y, y_dot, *extras[, outer_dot]).

    ``tangents``: the op's tangents (pair form), or the forward-AD tangents of the inputs
    (forward-AD form, ``keep_for_jvp``: y_dot is then also y's forward-AD tangent). ``outer``
    (pair form under forward AD): the forward-AD tangents of the inputs; their fused pass gives
    ``outer_dot``, y's forward-AD tangent, returned last.
    """

    @staticmethod
    def forward(op, options, keep_for_jvp, n_inputs, *tensors):
        inputs, tangents, outer = tensors[:n_inputs], tensors[n_inputs:2 * n_inputs], tensors[2 * n_inputs:]
        y, y_dot, extras = op.forward(inputs, tangents, options)
        if outer:
            return (y, y_dot, *extras, op.forward(inputs, outer, options)[1])
        return (y, y_dot, *extras)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, options, keep_for_jvp, n_inputs = inputs[:4]
        with_outer = len(inputs) - 4 == 3 * n_inputs
        y, y_dot, *extras = output
        tangent_of_y = extras.pop() if with_outer else y_dot
        ctx.op, ctx.options, ctx.n_inputs = op, options, n_inputs
        ctx.n_extras, ctx.n_tangent_inputs = len(extras) + with_outer, len(inputs) - 4 - n_inputs
        ctx.save_for_backward(*inputs[4:4 + n_inputs], y if op.save_output else None, *extras)
        # Held only until `jvp` takes it; never saved for backward.
        ctx.y_dot = tangent_of_y if keep_for_jvp else None
        if ctx.y_dot is None:
            # Tangents apply_pair cannot see reach `jvp`, which recomputes: those of a torch.func.jvp
            # around a torch.func.grad / vjp (forward over reverse) or around a vmap (whose batched
            # tensors are not unpacked) that wraps the call.
            ctx.save_for_forward(*inputs[4:4 + n_inputs])
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))

    @staticmethod
    def backward(ctx, grad_y, *unused):
        op, n = ctx.op, ctx.n_inputs
        saved = ctx.saved_tensors
        if not op.differentiable_backward and has_dual_tangent(grad_y, *saved):
            raise ValueError(f"forward AD through {op.name}'s backward (a backward inside a dual level, "
                             "as in a Hessian-vector product) is not supported: it reads saved statistics "
                             "that carry no tangent, so the result would be wrong")
        # Under torch.func.vjp the cotangent may be plain while the saved inputs are wrapped.
        options = op.options_for(ctx.options, grad_y, *saved, where="torch.func.grad / vjp")
        grads = op.backward(saved[:n], saved[n], saved[n + 1:], options, grad_y,
                            ctx.needs_input_grad[4:4 + n])
        return (None, None, None, None, *grads, *([None] * ctx.n_tangent_inputs))

    @staticmethod
    def jvp(ctx, _op, _options, _keep, _n, *tangents):
        y_dot, ctx.y_dot = ctx.y_dot, None
        input_tangents = tangents[:ctx.n_inputs]
        if y_dot is None and any(t is not None for t in input_tangents):
            saved = tuple(ctx.saved_tensors)
            options = ctx.op.options_for(ctx.options, *saved, *input_tangents,
                                         where="torch.func.jvp around torch.func.grad / vjp")
            _, y_dot, _ = ctx.op.forward(saved, tuple(input_tangents), options)
        return (y_dot, None, *([None] * ctx.n_extras))

    @staticmethod
    def vmap(info, in_dims, op, options, keep_for_jvp, n_inputs, *tensors):
        # torch.func.vmap (and jacrev, jacfwd, hessian): one fused call per slice of the batch,
        # as functorch's own fallback for ops without a batching rule; the kernels take no
        # extra batch dimension. Slices get the op's layout fix, as its entry point gives inputs.
        prepare = op.prepare or (lambda t: t)
        dims = in_dims[4:]

        def slice_of(t, d, i):
            if d is None or t is None:
                return t
            if info.batch_size == 0:  # an empty batch: one slice of zeros gives the outputs' shapes
                return prepare(t.new_zeros(t.shape[:d] + t.shape[d + 1:]))
            return prepare(t.select(d, i))

        results = [PairFunction.apply(op, options, keep_for_jvp, n_inputs,
                                      *(slice_of(t, d, i) for t, d in zip(tensors, dims)))
                   for i in range(max(info.batch_size, 1))]
        outputs = tuple(None if first is None else torch.stack([r[j] for r in results])[:info.batch_size]
                        for j, first in enumerate(results[0]))
        return outputs, tuple(None if out is None else 0 for out in outputs)


# autograd.Function.apply binds its arguments with inspect.signature(forward) at every call;
# a cached signature saves rebuilding it (tens of microseconds of host time per call).
PairFunction.forward.__signature__ = inspect.signature(PairFunction.forward)


class EagerPairFunction(torch.autograd.Function):
    """``PairFunction`` in autograd's context-first form, for calls outside torch.func transforms.

    The same forward, backward and jvp; only the form differs. ``apply`` of a Function that
    defines ``setup_context`` binds its arguments to ``forward``'s signature at every call,
    which was most of the host time of a pair op; this form skips it. torch.func transforms
    accept only the ``setup_context`` form, so ``apply_pair`` uses ``PairFunction`` under them.
    """

    @staticmethod
    def forward(ctx, *args):
        output = PairFunction.forward(*args)
        PairFunction.setup_context(ctx, args, output)
        return output

    backward = staticmethod(PairFunction.backward)
    jvp = staticmethod(PairFunction.jvp)


def backward_backend(backend: str) -> str:
    """The backend of an op's backward whose plain-torch reference is itself differentiable.

    The reference under ``create_graph=True`` (grad mode is on inside a backward only then),
    where the kernels' gradients would carry no graph and a double backward (a gradient penalty,
    say) would silently miss their part. An ordinary ``.backward()`` runs with grad mode off and
    keeps the kernels. (torch.func's wrapped tensors are routed to the reference before the
    backward is called: ``PairOp.options_for``.)
    """
    return "reference" if backend == "triton" and torch.is_grad_enabled() else backend


def refuse_double_backward(op_name: str, *tensors: Tensor | None) -> None:
    """For a backward whose gradients carry no graph (fused kernels, or residuals saved without
    one): raises ValueError under ``create_graph=True``, where a double backward (a gradient
    penalty, say) would silently miss the op's part of the second derivative. Grad mode is on
    inside a backward only then, or inside a torch.func transform, whose first-order gradients
    these are (wrapped ``tensors``: the backward's inputs and saved tensors)."""
    if torch.is_grad_enabled() and not functorch_wrapped(*tensors):
        raise ValueError(f"{op_name} does not support double backward: its gradients carry no graph "
                         "(backward with create_graph=True reached it)")


def transform_levels(kind: str | None = None) -> list[int]:
    """The levels of the torch.func transforms around this call, of ``kind`` ("Grad", "Jvp",
    "Vmap": grad and vjp are "Grad") or all; a higher level is further in."""
    # The flag first: it is cheap, and torch.compile can trace it (not the interpreter stack).
    if retrieve_all_functorch_interpreters is None or not torch._C._are_functorch_transforms_active():
        return []
    return [i.level() for i in retrieve_all_functorch_interpreters()
            if kind is None or i.key() == getattr(TransformType, kind)]


def nested_jvp_depth() -> int:
    """How many torch.func.jvp transforms are active around this call."""
    return len(transform_levels("Jvp"))


def forward_ad_active() -> bool:
    """Whether forward-mode AD is on around this call: a torch.func.jvp transform, or a
    ``torch.autograd.forward_ad`` dual level."""
    return fwAD._current_level >= 0 or nested_jvp_depth() > 0


def under_transform(*tensors: Tensor) -> bool:
    """Whether a torch.func transform is active, one of ``tensors`` carries a forward-AD tangent
    (a dual level), or torch.compile is tracing: where an op whose Function has no jvp or
    setup_context form must run as plain torch ops, which every transform differentiates and
    the compiler fuses."""
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or has_dual_tangent(*tensors))


def absent_if_zero(tangent: Tensor | None) -> Tensor | None:
    """Forward AD's efficient zero tangents cost nothing: treat them as absent."""
    if tangent is not None and tangent._is_zerotensor():
        return None
    return tangent


def backward_differentiated() -> bool:
    """Whether the backward of an op called here will itself be differentiated: a torch.func.grad
    / vjp transform around this call with another grad / vjp, a torch.func.jvp or a dual level
    outside it (reverse over reverse, forward over reverse)."""
    grad = transform_levels("Grad")
    if not grad:
        return False
    return (len(grad) > 1 or fwAD._current_level >= 0
            or any(level < max(grad) for level in transform_levels("Jvp")))


def vmap_innermost() -> bool:
    """Whether the innermost torch.func transform around this call is vmap: its batched tensors
    cannot be unpacked for forward-AD tangents (those of a jvp outside it reach the Function's
    ``jvp``, which recomputes)."""
    vmap = transform_levels("Vmap")
    return bool(vmap) and max(vmap) == max(transform_levels())


def grad_around_jvp() -> bool:
    """Whether a torch.func.grad / vjp transform wraps a torch.func.jvp one around this call."""
    jvp = transform_levels("Jvp")
    return bool(jvp) and any(level < max(jvp) for level in transform_levels("Grad"))


def forward_ad_tangents(op: PairOp, inputs: Sequence[Tensor | None]) -> tuple[Tensor | None, ...] | None:
    """The forward-AD tangents of the inputs (``torch.func.jvp`` or a dual level), checked and
    prepared as the op's kernels need them; None where there are none.

    Raises:
        ValueError: a tangent whose dtype or device is not its primal's, or tangents of nested
            torch.func.jvp transforms (the op's tangent is computed outside autograd, so it has
            no tangent of its own).
    """
    if vmap_innermost():
        return None
    tangents = tuple(None if t is None else absent_if_zero(fwAD.unpack_dual(t).tangent) for t in inputs)
    if all(t is None for t in tangents):
        return None
    for i, (tangent, primal) in enumerate(zip(tangents, inputs)):
        check_tangent(f"the forward-AD tangent of {op.name}'s {op.input_name(i)}", tangent, primal)
    if nested_jvp_depth() > 1:
        raise ValueError(f"inputs of {op.name} carry tangents of nested torch.func.jvp transforms: its "
                         "tangent is computed outside autograd, so higher-order forward AD is not supported")
    if torch._C._are_functorch_transforms_active() and grad_around_jvp():
        warnings.warn(f"torch.func.grad / vjp around torch.func.jvp: the tangent {op.name} computes carries no "
                      "gradient (it is computed outside autograd), so a loss that differentiates through it "
                      "misses this op's part; fine where the tangent is under a stop-gradient, as in MeanFlow's "
                      "target", stacklevel=3)
    return tangents if op.prepare is None else tuple(op.prepare(t) for t in tangents)


def apply_pair(
    op: PairOp,
    inputs: Sequence[Tensor | None],
    tangents: Sequence[Tensor | None] | None,
    options: tuple = (),
) -> tuple[Tensor, Tensor | None]:
    """Runs ``op``: pair form when ``tangents`` is given, forward-AD form when it is None.

    Returns:
        (y, y_dot): y differentiable to the inputs (and, under forward AD, carrying the
        forward-AD tangent of the inputs); y_dot detached, or None when no tangent was given
        (pair form) or found (forward-AD form).

    Raises:
        ValueError: a forward-AD tangent whose dtype or device is not its primal's, pair-form
            tangents that do not match the inputs one to one, or nested torch.func.jvp.
    """
    if tangents is not None and len(tangents) != len(inputs):
        raise ValueError(f"{op.name} takes one tangent (or None) per input: {len(inputs)} inputs, "
                         f"got {len(tangents)} tangents")
    if torch.compiler.is_compiling():
        if torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0:
            return _apply_untraced(op, inputs, tangents, options)  # forward AD: a graph break
        # Dynamo traces neither the Function (it defines jvp) nor the Triton launchers.
        return pair_compile.apply_compiled(op, inputs, tangents or (None,) * len(inputs), options)
    if dynamo_callback() is None:  # no compiled code around this call (the common case): 1 µs less
        return _apply(op, inputs, tangents, options)
    return _apply_untraced(op, inputs, tangents, options)


def _apply(op: PairOp, inputs, tangents, options: tuple) -> tuple[Tensor, Tensor | None]:
    functorch = torch._C._are_functorch_transforms_active()
    if functorch and not op.differentiable_backward and backward_differentiated():
        raise ValueError(f"differentiating {op.name}'s backward (torch.func.grad of grad, or "
                         "torch.func.jvp / a dual level around torch.func.grad / vjp, as in a Hessian-vector "
                         "product) is not supported: its backward reads saved statistics that carry neither "
                         "graph nor tangent, so the result would be wrong")
    # Forward AD is on only inside a dual level or a torch.func transform: outside both (the
    # training step), one global and one flag instead of an unpack per input.
    found = forward_ad_tangents(op, inputs) if functorch or fwAD._current_level >= 0 else None
    keep_for_jvp = found is not None
    outer = ()
    if tangents is None:
        tangents = found or (None,) * len(inputs)
    else:
        tangents = tuple(absent_if_zero(t) for t in tangents)
        # Dual inputs around a pair-form call: y's own forward-AD tangent comes from a second
        # fused pass over the inputs' tangents (the fused pass alone would drop it).
        outer = found or ()
    if not functorch:
        if not keep_for_jvp and not needs_autograd(inputs):
            # Nothing to differentiate: no autograd node, just the fused pass. Where a given
            # tangent requires grad, no_grad keeps y_dot detached, as the Function would (only
            # there: the context manager costs a few µs, the size of the whole call).
            if needs_autograd(tangents):
                with torch.no_grad():
                    return op.forward(tuple(inputs), tangents, options)[:2]
            return op.forward(tuple(inputs), tangents, options)[:2]
        function = EagerPairFunction
    else:
        function = PairFunction
    y, y_dot, *_ = function.apply(op, options, keep_for_jvp, len(inputs), *inputs, *tangents, *outer)
    return y, y_dot


# ``_apply`` as Python runs it, never traced by Dynamo, for calls inside compiled code: where
# torch.compile meets forward AD (which it cannot trace through a Function) the graph breaks
# around the call, and the frames below it (the Function, the launchers) are not compiled one by
# one either.
_apply_untraced = torch.compiler.disable(_apply)

try:  # Dynamo's frame hook: None unless compiled code (or its eager remainder) is running
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as dynamo_callback
except ImportError:  # pragma: no cover - builds without Dynamo's hook: always the untraced route
    def dynamo_callback():
        return True


def needs_autograd(inputs: Sequence[Tensor | None]) -> bool:
    """Whether autograd would record an op on these inputs (grad mode on, one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
