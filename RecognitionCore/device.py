"""Which torch device runs the networks, and how to name it in the UI.

"auto" must never pick a device that is present but broken (a CUDA driver mismatch shows up only at the first
kernel launch), so each candidate is tried with a tiny tensor operation before it is chosen.
"""

from __future__ import annotations

import logging
from typing import List, Union

import torch

from .errors import InputError

logger = logging.getLogger(__name__)


def _device_works(device: torch.device) -> bool:
    """Run one tiny operation on ``device``; broken drivers raise here rather than in the middle of an inference."""
    try:
        return float((torch.ones(2, device=device) + 1).sum().item()) == 4.0
    except Exception as error:  # any driver/runtime failure means "do not use this device"
        logger.warning("Device %s is present but does not work (%s); falling back.", device, error)
        return False


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> List[str]:
    """Names of the devices torch reports as present (not yet checked to work), e.g. ['cpu', 'cuda:0']."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def choose_device(preference: Union[str, torch.device] = "auto") -> torch.device:
    """The device to run on: "auto" = working CUDA, else working MPS, else CPU; or explicit "cpu", "cuda:1", "mps"."""
    text = str(preference).strip().lower()
    if text == "auto":
        if torch.cuda.is_available() and _device_works(torch.device("cuda")):
            return torch.device("cuda")
        if _mps_available() and _device_works(torch.device("mps")):
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise InputError(f"Unknown device {preference!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from error
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if device.index is None else device.index
        if index >= count:
            raise InputError(f"Device {preference!r} was requested but this machine has {count} usable CUDA GPU(s); "
                             f"available: {', '.join(available_devices())}.")
    elif device.type == "mps":
        if not _mps_available():
            raise InputError(f"Device 'mps' was requested but Apple MPS is not available; "
                             f"available: {', '.join(available_devices())}.")
    else:
        raise InputError(f"Unsupported device {preference!r}; available: {', '.join(available_devices())}.")
    if not _device_works(device):
        raise InputError(f"Device {preference!r} is present but fails a basic tensor operation (driver problem?); "
                         f"use 'cpu' instead.")
    return device


def describe_device(device: Union[str, torch.device]) -> str:
    """A short name for the UI, e.g. "NVIDIA H100 80GB HBM3 (80 GB)" or "CPU, 2 threads"."""
    device = torch.device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        properties = torch.cuda.get_device_properties(index)
        return f"{properties.name} ({properties.total_memory / 2 ** 30:.0f} GB)"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU, {torch.get_num_threads()} threads"
