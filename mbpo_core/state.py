"""Saving and loading step states safely: plain tensors and Python values only, atomic writes.

Loading uses ``torch.load(weights_only=True)``, which refuses pickled code, so a state file from
a shared bucket can be read without trusting its author.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class StateError(ValueError):
    """A state file is missing, unreadable, or not a state this code can load."""


def save_state(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
               ) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise StateError(f"state file {str(path)!r} does not exist") from None
    except Exception as e:  # torch raises many kinds of errors for bad files
        raise StateError(f"state file {str(path)!r} could not be loaded safely: {e}") from e
    if not isinstance(state, dict):
        raise StateError(f"state file {str(path)!r} holds a {type(state).__name__}, not a state")
    return state
