"""One arm's loop state at the end of its last finished round, in one file that proves itself.

Written after every round: to a temporary file in the same folder, then
renamed over the previous checkpoint (``os.replace`` is atomic), so a run
killed at any moment leaves either the previous round's checkpoint or this
one's, never half a file. The file is a header line, ``auror-checkpoint 2
<sha256 of the payload> <config>``, then the payload, ``torch.save`` of the
state: a flipped bit, a file of another config (``config``: the hash of the
arm's resolved config) or a round counter that disagrees with the per-round
history it carries is refused in one line before the loop uses any of it.
The payload is read with ``torch.load(weights_only=True)``: it holds only
tensors, lists, dicts, numbers, strings and ``None``, and loading it runs no
pickled code. Tensors are loaded onto the CPU, so a run checkpointed on a
GPU resumes on any machine (the loop moves them back).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, NoReturn

from pipeline.lazy import torch

from pipeline.core.errors import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read (truncated, from another version); one line, like a config error."""


UMASK = os.umask(0o022)  # (read by setting it; set back at once)
os.umask(UMASK)


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it over ``path``:
    a process killed at any moment leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it owner-only: the mode a plain open() would give
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # interrupted before the rename
            os.unlink(tmp)


MAGIC = b"auror-checkpoint 2"


class Checkpoint:
    """The checkpoint file at ``path`` (created on the first :meth:`save`) of the arm whose resolved
    config hashes to ``config``."""

    def __init__(self, path: str | os.PathLike, config: str) -> None:
        self.path, self.config = Path(path), config

    def save(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        header = b" ".join([MAGIC, hashlib.sha256(payload).hexdigest().encode(), self.config.encode()]) + b"\n"
        write_atomic(self.path, lambda f: (f.write(header), f.write(payload)))

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is no checkpoint yet; :class:`CheckpointError` (one line,
        naming the file and what to delete) for a file that does not prove itself."""
        if not self.path.is_file():
            return None
        header, _, payload = self.path.read_bytes().partition(b"\n")
        if not header.startswith(MAGIC + b" "):
            self._refuse("not a checkpoint of this version of auror's loop")
        if header.count(b" ") < 3 or not payload:
            self._refuse("damaged: its header or content is cut short")
        digest, _, config = header.removeprefix(MAGIC + b" ").partition(b" ")  # the config may hold spaces
        if hashlib.sha256(payload).hexdigest().encode() != digest:
            self._refuse("its content does not match its digest (damaged or edited)")
        if config.decode(errors="replace") != self.config:
            self._refuse(f"saved by a run of another config ({config.decode(errors='replace')}, this one is "
                         f"{self.config})")
        try:
            state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")  # also where no GPU is
        except Exception as err:  # noqa: BLE001 - truncated, not a torch file, unsafe content: all the same here
            self._refuse(f"unreadable checkpoint ({type(err).__name__})")
        history = state.get("history") if isinstance(state, dict) else None
        if not isinstance(history, list) or "round" not in state:
            self._refuse("not a checkpoint of auror's loop")
        if state["round"] != len(history) or [h.get("round") for h in history] != list(range(1, len(history) + 1)):
            self._refuse(f"its round counter ({state['round']}) disagrees with its history of {len(history)} rounds")
        return state

    def _refuse(self, why: str) -> NoReturn:
        raise CheckpointError(f"{self.path}: {why}; delete it to restart that arm from round 1")

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
