"""A trainer output directory read without torch: safetensors blobs are uploaded as they are.

``<dir>/shared/<id>.safetensors`` and ``<dir>/tasks/<name>.safetensors`` (DESIGN §4). Only the
JSON header of each blob is parsed here (its id, name, shared prompt, backbone); the server
validates the tensors.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.errors import RankoneError


class ArtifactReadError(RankoneError):
    """A file of the artifact directory is not a rankone safetensors blob."""


@dataclass(frozen=True)
class LocalArtifact:
    """One blob of an artifact directory: ``kind`` ``shared`` (``name`` = its id) or ``task``."""

    kind: str
    name: str
    path: Path
    blob: bytes
    metadata: dict[str, str]

    @property
    def shared(self) -> str:
        """The shared prompt a task composes with (its own id for a shared prompt)."""
        return self.metadata.get("shared", self.name)

    @property
    def base64(self) -> str:
        return base64.b64encode(self.blob).decode("ascii")


def read_header(blob: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors blob (tensor entries + ``__metadata__``).

    A copy of ``prompts.artifacts.read_header`` on purpose: the client installs and imports
    without torch or safetensors (``prompts`` needs both), and reads only this header.
    """
    if len(blob) < 8:
        raise ArtifactReadError(f"not a safetensors blob: {len(blob)} bytes")
    size = int.from_bytes(blob[:8], "little")
    if size <= 0 or 8 + size > len(blob):
        raise ArtifactReadError("truncated or corrupt safetensors blob")
    try:
        header = json.loads(blob[8 : 8 + size])
    except ValueError as e:
        raise ArtifactReadError(f"corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ArtifactReadError("corrupt safetensors header: not a JSON object")
    return header


def tensor_bytes(blob: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    """Each tensor's (dtype, shape, raw bytes): two blobs with equal values compare equal
    even when their metadata (``created``) differs."""
    header = read_header(blob)
    start = 8 + int.from_bytes(blob[:8], "little")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        lo, hi = entry["data_offsets"]
        out[name] = (entry["dtype"], list(entry["shape"]), blob[start + lo : start + hi])
    return out


def same_tensors(a: bytes, b: bytes) -> bool:
    return tensor_bytes(a) == tensor_bytes(b)


def _read(path: Path, kind: str) -> LocalArtifact:
    blob = path.read_bytes()
    try:
        metadata = read_header(blob).get("__metadata__") or {}
    except ArtifactReadError as e:
        raise ArtifactReadError(f"{path}: {e}") from None
    if metadata.get("kind") != kind:
        raise ArtifactReadError(
            f"{path}: expected a {kind!r} artifact, got {metadata.get('kind')!r}"
        )
    name = metadata.get("id" if kind == "shared" else "name", "")
    if name != path.stem:
        raise ArtifactReadError(
            f"{path}: holds {kind} {name!r}; the file must be named {name}.safetensors"
        )
    return LocalArtifact(kind, name, path, blob, dict(metadata))


@dataclass(frozen=True)
class LocalArtifacts:
    shared: list[LocalArtifact]
    tasks: list[LocalArtifact]


def read_artifact_dir(root: str | Path) -> LocalArtifacts:
    """The shared prompts and tasks of a trainer output directory (``--out``)."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactReadError(f"artifact directory {root} does not exist")
    shared = [_read(p, "shared") for p in sorted((root / "shared").glob("*.safetensors"))]
    tasks = [_read(p, "task") for p in sorted((root / "tasks").glob("*.safetensors"))]
    if not shared and not tasks:
        raise ArtifactReadError(
            f"{root} holds no artifacts: expected shared/<id>.safetensors and/or "
            "tasks/<name>.safetensors (the --out of a `rankone train` stage)"
        )
    return LocalArtifacts(shared, tasks)
