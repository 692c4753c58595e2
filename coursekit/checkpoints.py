"""Checkpoints that survive a crash: written atomically, loaded safely (notebook 03).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``: no pickled classes, no code run from the file, and no
breakage when the package's classes change.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or made for something else."""


def save_checkpoint(payload: dict, path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    A crash (or a Colab disconnect) in the middle leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({**payload, "format_version": FORMAT_VERSION}, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes files private; use the usual mode
        os.replace(temporary, path)  # atomic on POSIX and Windows, on the same file system
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, or raise a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first (coursekit train --run {path.parent})")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(
            f"{path} is corrupt or truncated and cannot be loaded ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'}). Nothing was changed: "
            "delete the file to start afresh, or restore it from a backup."
        ) from error
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        found = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a coursekit checkpoint of format {FORMAT_VERSION} (found {found!r}); "
            "it may come from another program or another version of coursekit"
        )
    return payload


def half_weights(state_dict: dict) -> dict:
    """Floating-point tensors in fp16: half the bytes, for the models that ship inside coursekit."""
    return {name: t.half() if t.is_floating_point() else t for name, t in state_dict.items()}


def float_weights(state_dict: dict) -> dict:
    """Floating-point tensors back in fp32, however they were stored."""
    return {name: t.float() if t.is_floating_point() else t for name, t in state_dict.items()}


def shipped_payload(payload: dict, made_by: str) -> dict:
    """What a shipped model keeps of a run's checkpoint: its EMA weights in fp16, steps, losses, settings."""
    return {
        "ema": half_weights(payload["ema"]),
        "step": payload["step"],
        "loss_history": payload["loss_history"],
        "metadata": payload["metadata"],
        "made_by": made_by,
    }


def load_model_weights(model: torch.nn.Module, state_dict: dict, source: str | Path) -> None:
    """``model.load_state_dict`` with an error that names the mismatch and the file."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        details = str(error).splitlines()
        raise CheckpointError(
            f"the checkpoint {source} was made for a different model ({' '.join(details[:3])[:400]}). "
            "Build the model with the configuration stored in the checkpoint, or use another run folder."
        ) from error
