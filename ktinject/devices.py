"""Device names checked against this machine, so a typo fails at load time in one sentence."""

from __future__ import annotations

import torch

from ktinject.errors import DeviceError


def default_device() -> torch.device:
    """The device models go to when neither a flag nor a rule names one."""
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def flag_device(value: str | None) -> torch.device:
    """The `--device` flag: the default device when it is not given. Unlike a rule's device,
    it may not be 'meta', which holds shapes but no weights to generate with."""
    if value is None:
        return default_device()
    device = check_device(value, where="--device", fix="--device")
    if device.type == "meta":
        raise DeviceError(
            f"--device: {value!r} holds no weights, only their shapes, so nothing can run on it; "
            "use 'cpu', 'cuda' or 'cuda:N' (--device)."
        )
    return device


def check_device(value: str | torch.device, *, where: str, fix: str) -> torch.device:
    """Parse `value` and make sure it exists here.

    `where` says who asked (a rule, a flag); `fix` names the key or flag that changes it.
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise DeviceError(
            f"{where}: {value!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N' ({fix})."
        ) from None
    if device.type == "cpu" or device.type == "meta":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        index = device.index or 0
        if count == 0:
            raise DeviceError(
                f"{where}: device '{value}' does not exist: this machine has no CUDA device; "
                f"use 'cpu' instead ({fix})."
            )
        if index >= count:
            raise DeviceError(
                f"{where}: device '{value}' does not exist: this machine has {count} CUDA "
                f"device(s), cuda:0 to cuda:{count - 1} ({fix})."
            )
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        raise DeviceError(
            f"{where}: device '{value}' is not available on this machine; use 'cpu' ({fix})."
        )
    return device


def host_ints_to(values: list[int], device: torch.device) -> torch.Tensor:
    """`values` as an int64 tensor on `device`, queued behind the work already there. A plain
    copy from host memory to a GPU synchronises the stream first, i.e. waits for the decode step
    queued before it (whose overlap with the host's work `Engine.decode_sampled` exists for);
    from pinned memory the copy is queued like a kernel."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=torch.long, pin_memory=pinned).to(device, non_blocking=pinned)
