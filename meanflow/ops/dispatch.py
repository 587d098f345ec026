"""The one place that picks an implementation of an op: Triton kernels or plain torch.

``MEANFLOW_BACKEND`` (read at every call, so tests and users can switch it at run time):

- ``auto`` (default): Triton for CUDA tensors, the plain-torch reference otherwise;
- ``triton``: always Triton; on CPU tensors this needs the interpreter (``TRITON_INTERPRET=1``);
- ``reference``: always plain torch.

Both implementations of an op expose the same launcher names (``<op>_forward``,
``<op>_backward``) with the same signatures, so callers never branch on the backend.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "reference")


def requested_backend() -> str:
    """The value of MEANFLOW_BACKEND, validated."""
    value = os.environ.get("MEANFLOW_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"MEANFLOW_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def triton_interpreting() -> bool:
    """Whether the Triton kernels run in Triton's interpreter. Triton reads TRITON_INTERPRET when
    a kernel is defined, so once the kernels are imported their own type decides (setting the
    variable later changes nothing, and a launch on CPU tensors would fail inside Triton)."""
    launch = sys.modules.get("meanflow.kernels.launch")
    if launch is not None:
        return launch.interpreting()
    value = os.environ.get("TRITON_INTERPRET", "0").strip().lower()
    return value in ("1", "true", "on", "yes", "y")  # the spellings Triton accepts


def resolve_backend(device: torch.device) -> str:
    """'triton' or 'reference' for tensors on ``device``; refuses devices Triton cannot run on
    (anything but CUDA, and the CPU under the interpreter: no meta tensors, for example)."""
    backend = requested_backend()
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda":
        if device.type != "cpu":
            raise ValueError(f"MEANFLOW_BACKEND=triton runs on CUDA tensors (or CPU tensors under "
                             f"TRITON_INTERPRET=1), got {device.type} tensors; "
                             "use MEANFLOW_BACKEND=reference")
        if not triton_interpreting():
            raise ValueError(
                f"MEANFLOW_BACKEND=triton needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 "
                "set before meanflow is imported"
            )
    return backend


def implementation(op: str, backend: str) -> ModuleType:
    """The module holding ``op``'s launchers for ``backend`` ('triton' or 'reference')."""
    package = "meanflow.kernels" if backend == "triton" else "meanflow.reference"
    return importlib.import_module(f"{package}.{op}")
