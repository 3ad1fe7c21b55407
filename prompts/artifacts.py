"""The artifact format: one safetensors blob per shared prompt and per task.

The same bytes are written to disk by the trainer, uploaded (base64) to the API and stored as
the value in Redis. Nothing is ever pickled.

shared prompt blob: tensor ``prompt`` [L, d]; metadata ``format``, ``kind=shared``, ``id``,
``backbone``, ``created`` (+ free-form ``meta`` JSON).
task blob: tensors ``u`` [L, r], ``v`` [r, d]; metadata ``format``, ``kind=task``, ``name``,
``shared``, ``backbone``, ``created`` (+ ``meta`` JSON).
On disk: ``<dir>/shared/<id>.safetensors`` and ``<dir>/tasks/<name>.safetensors``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from prompts.compose import compose_prompt
from prompts.errors import ArtifactError, BackboneMismatchError, InvalidNameError

FORMAT = "rankone/1"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_RANK = 64
MAX_PROMPT_LENGTH = 4096
T = TypeVar("T")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(name: str, what: str = "name") -> str:
    """Names of tasks and shared prompts: ``^[a-z0-9][a-z0-9._-]{0,63}$`` and no ``..``."""
    # fullmatch, not match: ``$`` alone would accept a trailing newline ("qa\n").
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


@dataclass(frozen=True)
class SharedPrompt:
    """A shared soft prompt ``prompt`` [L, d] and where it came from."""

    id: str
    prompt: Tensor  # [L, d]
    backbone: str
    created: str = field(default_factory=utc_now)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def dim(self) -> int:
        return int(self.prompt.shape[1])


@dataclass(frozen=True)
class TaskFactors:
    """A task's rank-r factors ``u`` [L, r], ``v`` [r, d] over the shared prompt ``shared``."""

    name: str
    shared: str
    u: Tensor  # [L, r]
    v: Tensor  # [r, d]
    backbone: str
    created: str = field(default_factory=utc_now)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    @property
    def length(self) -> int:
        return int(self.u.shape[0])

    @property
    def dim(self) -> int:
        return int(self.v.shape[1])


def _check_tensor(name: str, t: Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ArtifactError(f"{what}: tensor {name!r} has dtype {t.dtype}, expected a float type")
    if t.dim() != 2:
        raise ArtifactError(f"{what}: tensor {name!r} must be 2-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ArtifactError(f"{what}: tensor {name!r} is empty (shape {tuple(t.shape)})")
    if not bool(torch.isfinite(t).all()):
        raise ArtifactError(f"{what}: tensor {name!r} has NaN or infinite values")


def _check_provenance(backbone: object, created: object, what: str) -> None:
    # Encoding refuses what decoding would refuse, so no blob is written that cannot be read.
    for key, value in (("backbone", backbone), ("created", created)):
        if not isinstance(value, str) or not value:
            raise ArtifactError(f"{what}: {key} must be a non-empty string, got {value!r}")


def validate_shared(sp: SharedPrompt) -> SharedPrompt:
    check_name(sp.id, "shared prompt id")
    _check_provenance(sp.backbone, sp.created, f"shared prompt {sp.id!r}")
    _check_tensor("prompt", sp.prompt, f"shared prompt {sp.id!r}")
    if sp.length > MAX_PROMPT_LENGTH:
        raise ArtifactError(
            f"shared prompt {sp.id!r}: length {sp.length} exceeds the limit {MAX_PROMPT_LENGTH}"
        )
    return sp


def validate_task(tf: TaskFactors, *, max_rank: int = MAX_RANK) -> TaskFactors:
    check_name(tf.name, "task name")
    check_name(tf.shared, "shared prompt id")
    what = f"task {tf.name!r}"
    _check_provenance(tf.backbone, tf.created, what)
    _check_tensor("u", tf.u, what)
    _check_tensor("v", tf.v, what)
    if tf.u.shape[1] != tf.v.shape[0]:
        raise ArtifactError(
            f"{what}: u {tuple(tf.u.shape)} and v {tuple(tf.v.shape)} disagree on the rank "
            "(expected u [L, r] and v [r, d])"
        )
    if tf.rank > max_rank:
        raise ArtifactError(f"{what}: rank {tf.rank} exceeds the limit {max_rank}")
    return tf


def check_task_fits(tf: TaskFactors, sp: SharedPrompt) -> None:
    """A task's factors must match its shared prompt's [L, d] and backbone."""
    if tf.shared != sp.id:
        raise ArtifactError(
            f"task {tf.name!r} refers to shared prompt {tf.shared!r}, not {sp.id!r}"
        )
    if tf.length != sp.length or tf.dim != sp.dim:
        raise ArtifactError(
            f"task {tf.name!r}: factors u {tuple(tf.u.shape)}, v {tuple(tf.v.shape)} do not fit "
            f"shared prompt {sp.id!r} of shape [L={sp.length}, d={sp.dim}] "
            f"(expected u [{sp.length}, r] and v [r, {sp.dim}])"
        )
    check_backbone(tf.backbone, sp.backbone, f"task {tf.name!r}")


# A composed prompt row may be at most this many times the largest input-embedding row
# (L2 norms). Trained prompts sit within a small multiple of the token embeddings; a row a
# thousand times longer than any token the backbone has seen is garbage to it, and past this
# the half-precision range (65504) is near for typical embedding norms.
PROMPT_NORM_FACTOR = 1000.0


def check_composed(tf: TaskFactors, prompt: Tensor, bound: float, dtype: torch.dtype) -> None:
    """The task prompt ``P ⊙ (U @ V)`` [L, d] must be finite (in the model's ``dtype`` too) and
    its rows no longer than ``bound``: factors that are each finite can still overflow together.
    """
    with torch.no_grad():
        composed = compose_prompt(
            prompt.float(), tf.u.float().to(prompt.device), tf.v.float().to(prompt.device)
        )
        finite = bool(torch.isfinite(composed).all()) and bool(
            torch.isfinite(composed.to(dtype)).all()
        )
        largest = float(composed.norm(dim=-1).max()) if finite and composed.numel() else 0.0
    if not finite or largest > bound:
        shown = "not finite" if not finite else f"{largest:.4g}"
        raise ArtifactError(
            f"task {tf.name!r}: the composed prompt P ⊙ (u @ v) has a row norm of {shown}; "
            f"this backbone accepts at most {bound:.4g} ({PROMPT_NORM_FACTOR:g} × its largest "
            "input-embedding norm): scale u and v down"
        )


def check_backbone(found: str, expected: str | None, what: str) -> None:
    if expected is not None and found != expected:
        raise BackboneMismatchError(
            f"{what} was trained on backbone {found!r}, but this backbone is {expected!r}: "
            "retrain or re-export the prompt for this model"
        )


def _meta_json(meta: dict[str, Any]) -> str:
    try:
        return json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"metadata is not JSON-serialisable: {e}") from e


def _save_canonical(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """``safetensors.save`` with its JSON header rewritten with sorted keys.

    safetensors writes the metadata map in hash order, so encoding the same artifact twice
    gives different bytes; the header is rewritten canonically (sorted keys, padded to 8
    bytes as safetensors does) so equal artifacts are equal blobs. The tensor data is untouched.
    """
    blob = st_save(tensors, metadata=metadata)
    header_len = int.from_bytes(blob[:8], "little")
    header = read_header(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + header_len :]


def encode_shared(sp: SharedPrompt) -> bytes:
    validate_shared(sp)
    metadata = {
        "format": FORMAT,
        "kind": "shared",
        "id": sp.id,
        "backbone": sp.backbone,
        "created": sp.created,
        "meta": _meta_json(sp.meta),
    }
    return _save_canonical({"prompt": sp.prompt.detach().cpu().contiguous()}, metadata)


def encode_task(tf: TaskFactors, *, max_rank: int = MAX_RANK) -> bytes:
    """The task blob; ``max_rank`` is the caller's limit (a server may allow more than 64)."""
    validate_task(tf, max_rank=max_rank)
    metadata = {
        "format": FORMAT,
        "kind": "task",
        "name": tf.name,
        "shared": tf.shared,
        "backbone": tf.backbone,
        "created": tf.created,
        "meta": _meta_json(tf.meta),
    }
    tensors = {"u": tf.u.detach().cpu().contiguous(), "v": tf.v.detach().cpu().contiguous()}
    return _save_canonical(tensors, metadata)


def read_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors blob, read without touching the tensors: per tensor
    its ``dtype``, ``shape`` and ``data_offsets``, and the ``__metadata__`` strings.

    The one reader of the header in rankone's torch side (``client/artifacts.py`` keeps its own
    copy: the client must import without torch or safetensors).
    """
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < 8:
        raise ArtifactError(f"not a safetensors blob: {len(data) if data else 0} bytes")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise ArtifactError(
            f"truncated or corrupt safetensors blob: header claims {header_len} bytes, "
            f"blob has {len(data) - 8}"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"corrupt safetensors blob: {e}") from e
    if not isinstance(header, dict):
        raise ArtifactError("corrupt safetensors blob: its header is not a JSON object")
    return header


def blob_shapes(data: bytes) -> dict[str, list[int]]:
    """Each tensor's shape, from the header alone (``{"u": [L, r], "v": [r, d]}``)."""
    return {k: list(v["shape"]) for k, v in read_header(data).items() if k != "__metadata__"}


def blob_metadata(data: bytes) -> dict[str, str]:
    """The blob's ``__metadata__`` (format, kind, id or name, backbone, created, meta)."""
    return dict(read_header(data).get("__metadata__") or {})


def _read_blob(
    data: bytes, kind: str, tensors: tuple[str, ...]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    header = read_header(data)
    try:
        loaded = st_load(bytes(data))
    except (SafetensorError, ValueError) as e:
        raise ArtifactError(f"corrupt safetensors blob: {e}") from e
    metadata = header.get("__metadata__") or {}
    fmt = metadata.get("format")
    if fmt != FORMAT:
        raise ArtifactError(f"unsupported artifact format {fmt!r}, expected {FORMAT!r}")
    found_kind = metadata.get("kind")
    if found_kind != kind:
        raise ArtifactError(f"expected a {kind!r} artifact, got kind {found_kind!r}")
    names = set(loaded)
    if names != set(tensors):
        raise ArtifactError(
            f"a {kind!r} artifact must hold exactly the tensors {sorted(tensors)}, found {sorted(names)}"
        )
    for key in ("backbone", "created", *(("id",) if kind == "shared" else ("name", "shared"))):
        if not metadata.get(key):
            raise ArtifactError(f"{kind!r} artifact is missing metadata field {key!r}")
    return loaded, metadata


def _meta_from(metadata: dict[str, str]) -> dict[str, Any]:
    raw = metadata.get("meta") or "{}"
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ArtifactError(f"artifact metadata field 'meta' is not JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ArtifactError("artifact metadata field 'meta' must be a JSON object")
    return meta


def parse_shared(data: bytes) -> SharedPrompt:
    """A shared-prompt blob read as one (format, kind, tensors, metadata fields), its values
    not yet validated: for a writer whose one gate validates (the server's store)."""
    tensors, metadata = _read_blob(data, "shared", ("prompt",))
    return SharedPrompt(
        id=metadata["id"],
        prompt=tensors["prompt"],
        backbone=metadata["backbone"],
        created=metadata["created"],
        meta=_meta_from(metadata),
    )


def parse_task(data: bytes) -> TaskFactors:
    """A task blob read as one, its values not yet validated (see ``parse_shared``)."""
    tensors, metadata = _read_blob(data, "task", ("u", "v"))
    return TaskFactors(
        name=metadata["name"],
        shared=metadata["shared"],
        u=tensors["u"],
        v=tensors["v"],
        backbone=metadata["backbone"],
        created=metadata["created"],
        meta=_meta_from(metadata),
    )


def decode_shared(data: bytes, *, backbone: str | None = None) -> SharedPrompt:
    """Read and validate a shared-prompt blob; refuse it if made for another ``backbone``."""
    sp = validate_shared(parse_shared(data))
    check_backbone(sp.backbone, backbone, f"shared prompt {sp.id!r}")
    return sp


def decode_task(
    data: bytes,
    *,
    backbone: str | None = None,
    shared: SharedPrompt | None = None,
    max_rank: int = MAX_RANK,
) -> TaskFactors:
    """Read and validate a task blob; with ``shared`` given, check the factors fit it."""
    tf = validate_task(parse_task(data), max_rank=max_rank)
    check_backbone(tf.backbone, backbone, f"task {tf.name!r}")
    if shared is not None:
        check_task_fits(tf, shared)
    return tf


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def from_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ArtifactError(f"invalid base64: {e}") from e


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file private (0600); artifacts are read by other processes
            # (a server, another user's trainer), so give them a plain file's mode.
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry is only on disk once the directory is synced."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shared_path(root: Path, shared_id: str) -> Path:
    return Path(root) / "shared" / f"{check_name(shared_id, 'shared prompt id')}.safetensors"


def task_path(root: Path, name: str) -> Path:
    return Path(root) / "tasks" / f"{check_name(name, 'task name')}.safetensors"


def save_shared(root: Path, sp: SharedPrompt) -> Path:
    path = shared_path(root, sp.id)
    write_atomic(path, encode_shared(sp))
    return path


def save_task(root: Path, tf: TaskFactors) -> Path:
    path = task_path(root, tf.name)
    write_atomic(path, encode_task(tf))
    return path


def _read_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {path}: {e.strerror or e}") from e


def load_shared(path: Path, *, backbone: str | None = None) -> SharedPrompt:
    try:
        return decode_shared(_read_file(path), backbone=backbone)
    except ArtifactError as e:
        raise type(e)(f"{path}: {e}") from e


def load_task(
    path: Path, *, backbone: str | None = None, shared: SharedPrompt | None = None
) -> TaskFactors:
    try:
        return decode_task(_read_file(path), backbone=backbone, shared=shared)
    except ArtifactError as e:
        raise type(e)(f"{path}: {e}") from e


@dataclass
class ArtifactDir:
    """Everything under an artifact directory, validated: tasks fit their shared prompts."""

    shared: dict[str, SharedPrompt]
    tasks: dict[str, TaskFactors]


def _check_file_name(path: Path, name: str, what: str) -> None:
    # The file name is the key: a renamed or copied file would otherwise shadow another task.
    if path.stem != name:
        raise ArtifactError(
            f"{path}: holds {what} {name!r}; the file must be named {name}.safetensors"
        )


def load_artifact_dir(
    root: Path, *, backbone: str | None = None, validate: bool = True
) -> ArtifactDir:
    """Every artifact under ``root/shared`` and ``root/tasks``, validated and cross-checked.

    Refuses (``ArtifactError``) a file that does not decode, one made for another ``backbone``,
    a file whose name is not its artifact's id or name, and a task whose shared prompt is
    missing or does not fit it. ``validate=False`` reads each file as its kind of artifact and
    checks names and references only: for a writer whose one gate validates the values (the
    server's store, seeding from a directory).
    """
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} does not exist")
    shared: dict[str, SharedPrompt] = {}
    for path in sorted((root / "shared").glob("*.safetensors")):
        sp = load_shared(path, backbone=backbone) if validate else _parse_file(path, parse_shared)
        _check_file_name(path, sp.id, "shared prompt id")
        shared[sp.id] = sp
    tasks: dict[str, TaskFactors] = {}
    for path in sorted((root / "tasks").glob("*.safetensors")):
        tf = load_task(path, backbone=backbone) if validate else _parse_file(path, parse_task)
        _check_file_name(path, tf.name, "task name")
        if tf.shared not in shared:
            raise ArtifactError(
                f"{path}: task {tf.name!r} needs shared prompt {tf.shared!r}, "
                f"which is not in {root / 'shared'}"
            )
        if validate:
            check_task_fits(tf, shared[tf.shared])
        tasks[tf.name] = tf
    return ArtifactDir(shared=shared, tasks=tasks)


def _parse_file(path: Path, parse: Callable[[bytes], T]) -> T:
    try:
        return parse(_read_file(path))
    except ArtifactError as e:
        raise type(e)(f"{path}: {e}") from e
