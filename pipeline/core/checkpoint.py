"""One arm's loop state at the end of its last finished round, in one file.

Written after every round: to a temporary file in the same folder, then
renamed over the previous checkpoint (``os.replace`` is atomic), so a run
killed at any moment leaves either the previous round's checkpoint or this
one's, never half a file. Read with ``torch.load(weights_only=True)``: a
checkpoint holds only tensors, lists, dicts, numbers, strings and ``None``,
and loading one runs no pickled code. Tensors are loaded onto the CPU, so a
run checkpointed on a GPU resumes on any machine (the loop moves them back).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from pipeline.core.errors import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read (truncated, from another version); one line, like a config error."""


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it over ``path``:
    a process killed at any moment leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # interrupted before the rename
            os.unlink(tmp)


class Checkpoint:
    """The checkpoint file at ``path`` (created on the first :meth:`save`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def save(self, state: dict[str, Any]) -> None:
        write_atomic(self.path, lambda f: torch.save(state, f))

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is no checkpoint yet."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")  # also where no GPU is
        except Exception as err:  # noqa: BLE001 - truncated, not a torch file, unsafe content: all the same here
            reason = " ".join(str(err).split())[:200]
            raise CheckpointError(f"{self.path}: unreadable checkpoint ({reason}); delete it to restart that "
                                  "arm from round 1") from None
        if not isinstance(state, dict) or "round" not in state:
            raise CheckpointError(f"{self.path}: not a checkpoint of auror's loop; delete it to restart that arm "
                                  "from round 1")
        return state

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
