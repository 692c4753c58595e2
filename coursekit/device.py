"""Where the tensors live: CUDA, then Apple's MPS, then the CPU, unless you say otherwise."""

from __future__ import annotations

import torch

DEVICE_KINDS = ("cuda", "mps", "cpu")


def pick_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device to use: ``preferred`` if given (and present), else cuda, then mps, then cpu."""
    if preferred is not None and str(preferred) != "auto":
        try:
            device = torch.device(preferred)
        except RuntimeError:
            device = None
        if device is None or device.type not in DEVICE_KINDS:
            raise ValueError(f"unknown device {preferred!r}; choose one of {DEVICE_KINDS} or 'auto'")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' was asked for, but PyTorch sees no CUDA GPU here; "
                "use 'auto' or 'cpu' (in Colab: Runtime > Change runtime type > GPU)"
            )
        if device.type == "mps" and not _mps_available():
            raise ValueError("device 'mps' was asked for, but Apple's MPS is not available here; use 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device | None = None) -> str:
    """One line naming the device, for the top of a notebook."""
    device = pick_device(device)
    if device.type == "cuda":
        index = device.index or 0
        properties = torch.cuda.get_device_properties(index)
        return (
            f"cuda: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, "
            f"bf16 {'native' if supports_native_bf16(device) else 'not native'}"
        )
    if device.type == "mps":
        return "mps: Apple GPU"
    return f"cpu: {torch.get_num_threads()} threads"


def supports_native_bf16(device: torch.device) -> bool:
    """True where bf16 runs natively: CUDA compute capability 8.0+ (A100, H100, RTX 30xx...).

    ``torch.cuda.is_bf16_supported()`` also says True on a T4, where bf16 is only emulated and
    slow; the compute capability is the honest test.
    """
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def in_colab() -> bool:
    """True inside Google Colab."""
    import sys

    return "google.colab" in sys.modules


def environment_report(device: torch.device | None = None) -> str:
    """A few lines for the top of a notebook: versions, the device, and a hint when Colab has no GPU."""
    import platform

    import coursekit

    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, coursekit {coursekit.__version__}",
        f"device: {describe_device(device)}",
    ]
    if in_colab() and not torch.cuda.is_available():
        lines.append(
            "hint: this Colab session has no GPU. Everything still runs on the CPU (slower); for a "
            "GPU choose Runtime > Change runtime type > T4 GPU, then run the notebook again."
        )
    return "\n".join(lines)
