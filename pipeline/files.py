"""Files and errors every module shares: the user-facing error and writes that appear only when whole.

Nothing here knows of MLflow or the command line, so the data and metrics modules can use it
without importing either.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class PipelineError(Exception):
    """A problem the user can fix. Its message says what is wrong and what to do next."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of the file's bytes."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path`` and move it into place only if the block succeeds,
    so a failed or interrupted stage never leaves a half-written file that looks whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give it a new file's mode
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w"):
    """Open ``path`` for writing through :func:`atomic_path`: it appears only when complete."""
    with atomic_path(path) as temporary, open(temporary, mode) as file:
        yield file


def write_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write ``cfg``, resolved, as YAML to ``path`` (atomically): the record of how outputs were made."""
    with atomic_output(path) as file:
        file.write(OmegaConf.to_yaml(cfg, resolve=True))
