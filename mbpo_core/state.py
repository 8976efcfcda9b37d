"""Saving and loading step states safely: plain tensors and Python values only, atomic writes.

Loading uses ``torch.load(weights_only=True)``, which refuses pickled code, so a state file from
a shared bucket can be read without trusting its author. A state file starts with a one-line
header carrying the sha256 of the rest, so a corrupted or truncated file fails with an error that
names it instead of loading garbage. Files without the header (a plain ``torch.save``) still load.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from .storage import write_atomic


class StateError(ValueError):
    """A state file is missing, unreadable, or not a state this code can load."""


MAGIC = b"MBPO-STATE v1 sha256="
# what a plain torch.save file starts with: a zip archive, or (legacy format) a pickle protocol
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80\x02")


def save_state(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """The checksum header and the torch payload, written atomically (temporary file + rename)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    write_atomic(Path(path), MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n", payload)


def load_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
               ) -> dict[str, Any]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise StateError(f"state file {str(path)!r} does not exist") from None
    if data.startswith(MAGIC):
        header, _, data = data.partition(b"\n")
        expected = header[len(MAGIC):].decode(errors="replace")
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise StateError(f"state file {str(path)!r} fails its checksum (sha256 {actual[:16]}..., "
                             f"header says {expected[:16]}...): corrupt or truncated")
    elif not data.startswith(TORCH_FILE_STARTS):
        raise StateError(f"state file {str(path)!r}: this is not a state file of this project "
                         f"(it starts with {data[:16]!r}); allowed: a state.pt written by "
                         "`mbpo train --save-state`, or a step state of a pipeline run")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many kinds of errors for bad files
        raise StateError(f"state file {str(path)!r} could not be loaded safely: {e}") from e
    if not isinstance(state, dict):
        raise StateError(f"state file {str(path)!r} holds a {type(state).__name__}, not a state")
    return state
