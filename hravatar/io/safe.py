"""Safe, atomic tensor files: safetensors + JSON metadata, never pickle."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A file could not be read as the expected kind of hravatar file (message is one line)."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + rename.

    A crash or a full disk leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the usual umask-based mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_safetensors_atomic(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Serialise ``tensors`` (CPU, contiguous) with string ``metadata`` and write atomically."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata or {}))


def read_safetensors_header(path: str | Path) -> dict:
    """Parse the JSON header of a safetensors file; raises CheckpointError on foreign files."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: file is too short to be a safetensors file")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a table)")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"{path}: corrupted safetensors header (entry '{k}')") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or corrupted (expected {8 + n + end} bytes, found {size})")
    return header


def load_safetensors_checked(path: str | Path, required_meta: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load tensors + metadata, validating the container. Raises CheckpointError (one line)."""
    from safetensors.torch import load_file

    path = Path(path)
    header = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    for key in required_meta:
        if key not in meta:
            raise CheckpointError(f"{path}: not a hravatar file of the expected kind (missing '{key}' metadata)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: corrupted tensor data ({str(e).splitlines()[0]})") from None
    return tensors, dict(meta)
