"""The artifact format: bit-exact round trips, and a clear refusal for every bad blob."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from prompts import (
    FORMAT,
    MAX_RANK,
    ArtifactError,
    BackboneMismatchError,
    SharedPrompt,
    TaskFactors,
    check_name,
    check_task_fits,
    decode_shared,
    decode_task,
    encode_shared,
    encode_task,
    from_base64,
    load_artifact_dir,
    load_shared,
    load_task,
    save_shared,
    save_task,
    to_base64,
    write_atomic,
)

L, D, BACKBONE = 4, 6, "gpt2-0123456789abcdef"


def _shared(dtype: torch.dtype = torch.float32, **kw) -> SharedPrompt:
    prompt = torch.randn(L, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    return SharedPrompt(**{"id": "fam", "prompt": prompt, "backbone": BACKBONE, **kw})


def _task(rank: int = 1, dtype: torch.dtype = torch.float32, **kw) -> TaskFactors:
    gen = torch.Generator().manual_seed(rank)
    u = torch.randn(L, rank, generator=gen).to(dtype)
    v = torch.randn(rank, D, generator=gen).to(dtype)
    args = {"name": "qa", "shared": "fam", "u": u, "v": v, "backbone": BACKBONE, **kw}
    return TaskFactors(**args)


def _meta(kind: str, **overrides: str | None) -> dict[str, str]:
    meta = {"format": FORMAT, "kind": kind, "backbone": BACKBONE, "created": "2026-01-01T00:00:00Z"}
    meta.update({"id": "fam"} if kind == "shared" else {"name": "qa", "shared": "fam"})
    meta.update({k: v for k, v in overrides.items() if v is not None})
    return {k: v for k, v in meta.items() if overrides.get(k, "") is not None}


def _shared_blob(prompt: torch.Tensor | None = None, **meta: str | None) -> bytes:
    tensors = {"prompt": torch.ones(L, D) if prompt is None else prompt}
    return st_save(tensors, metadata=_meta("shared", **meta))


def _task_blob(tensors: dict[str, torch.Tensor] | None = None, **meta: str | None) -> bytes:
    tensors = tensors if tensors is not None else {"u": torch.ones(L, 1), "v": torch.ones(1, D)}
    return st_save(tensors, metadata=_meta("task", **meta))


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shared_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    sp = _shared(dtype, meta={"note": "x", "n": 3})
    blob = encode_shared(sp)
    back = decode_shared(blob, backbone=BACKBONE)
    assert back.prompt.dtype == dtype
    assert torch.equal(back.prompt.view(torch.uint8), sp.prompt.view(torch.uint8))
    assert (back.id, back.backbone, back.created, back.meta) == (
        sp.id,
        sp.backbone,
        sp.created,
        sp.meta,
    )
    assert encode_shared(back) == blob


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [1, 3])
def test_task_round_trip_is_bit_exact(dtype: torch.dtype, rank: int) -> None:
    tf = _task(rank, dtype, meta={"task_id": 2})
    blob = encode_task(tf)
    back = decode_task(blob, backbone=BACKBONE, shared=_shared())
    assert back.rank == rank and back.u.dtype == dtype
    assert torch.equal(back.u.view(torch.uint8), tf.u.view(torch.uint8))
    assert torch.equal(back.v.view(torch.uint8), tf.v.view(torch.uint8))
    assert (back.name, back.shared, back.meta, back.created) == (
        tf.name,
        tf.shared,
        tf.meta,
        tf.created,
    )
    assert encode_task(back) == blob


def test_base64_round_trip() -> None:
    blob = encode_task(_task())
    text = to_base64(blob)
    assert isinstance(text, str)
    assert from_base64(text) == blob
    with pytest.raises(ArtifactError, match="invalid base64"):
        from_base64("not base64!!")


def test_file_round_trip(tmp_path: Path) -> None:
    sp, tf = _shared(torch.bfloat16), _task(2)
    sp_path, tf_path = save_shared(tmp_path, sp), save_task(tmp_path, tf)
    assert sp_path == tmp_path / "shared" / "fam.safetensors"
    assert tf_path == tmp_path / "tasks" / "qa.safetensors"
    assert sp_path.read_bytes() == encode_shared(sp)
    assert encode_shared(load_shared(sp_path)) == encode_shared(sp)
    assert encode_task(load_task(tf_path, shared=sp)) == encode_task(tf)
    loaded = load_artifact_dir(tmp_path, backbone=BACKBONE)
    assert set(loaded.shared) == {"fam"} and set(loaded.tasks) == {"qa"}
    assert torch.equal(loaded.tasks["qa"].v, tf.v)


# --- refusals of bytes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "not a safetensors blob: 0 bytes", id="empty"),
        pytest.param(b"\x01\x02", "not a safetensors blob", id="tiny"),
        pytest.param(b"\xff" * 64, "truncated or corrupt", id="garbage"),
        pytest.param((1000).to_bytes(8, "little") + b"{}", "header claims 1000", id="header-cut"),
        pytest.param((2).to_bytes(8, "little") + b"[]", "corrupt safetensors", id="header-list"),
    ],
)
def test_refuses_bytes_that_are_no_blob(data: bytes, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        decode_shared(data)


def test_refuses_corrupted_header() -> None:
    blob = bytearray(encode_shared(_shared()))
    blob[9:15] = b"\x00\xff\x00\xff\x00\xff"
    with pytest.raises(ArtifactError, match="corrupt safetensors blob"):
        decode_shared(bytes(blob))


def test_refuses_truncated_blob() -> None:
    blob = encode_task(_task())
    with pytest.raises(ArtifactError, match="corrupt"):
        decode_task(blob[:-5])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        decode_task(blob[:20])


def test_refuses_wrong_kind() -> None:
    with pytest.raises(ArtifactError, match="expected a 'shared' artifact, got kind 'task'"):
        decode_shared(encode_task(_task()))
    with pytest.raises(ArtifactError, match="expected a 'task' artifact, got kind 'shared'"):
        decode_task(encode_shared(_shared()))


@pytest.mark.parametrize("fmt", ["rankone/2", None])
def test_refuses_wrong_format(fmt: str | None) -> None:
    with pytest.raises(ArtifactError, match="unsupported artifact format"):
        decode_shared(_shared_blob(format=fmt))


@pytest.mark.parametrize("key", ["backbone", "created", "id"])
def test_refuses_missing_shared_metadata(key: str) -> None:
    with pytest.raises(ArtifactError, match=f"missing metadata field '{key}'"):
        decode_shared(_shared_blob(**{key: None}))


@pytest.mark.parametrize("key", ["backbone", "created", "name", "shared"])
def test_refuses_missing_task_metadata(key: str) -> None:
    with pytest.raises(ArtifactError, match=f"missing metadata field '{key}'"):
        decode_task(_task_blob(**{key: None}))


def test_refuses_bad_meta_json() -> None:
    with pytest.raises(ArtifactError, match="'meta' is not JSON"):
        decode_shared(_shared_blob(meta="{nope"))
    with pytest.raises(ArtifactError, match="must be a JSON object"):
        decode_shared(_shared_blob(meta="[1]"))


@pytest.mark.parametrize(
    "tensors",
    [
        pytest.param({"u": torch.ones(L, 1)}, id="missing-v"),
        pytest.param(
            {"u": torch.ones(L, 1), "v": torch.ones(1, D), "w": torch.ones(1)}, id="extra"
        ),
        pytest.param({"prompt": torch.ones(L, D)}, id="other-names"),
    ],
)
def test_refuses_wrong_tensor_set(tensors: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ArtifactError, match=r"must hold exactly the tensors \['u', 'v'\]"):
        decode_task(_task_blob(tensors))


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        pytest.param({"u": torch.ones(L), "v": torch.ones(1, D)}, "must be 2-D", id="u-1d"),
        pytest.param({"u": torch.ones(L, 1), "v": torch.ones(1, 1, D)}, "must be 2-D", id="v-3d"),
        pytest.param(
            {"u": torch.ones(L, 2), "v": torch.ones(1, D)}, "disagree on the rank", id="rank"
        ),
        pytest.param({"u": torch.ones(L, 0), "v": torch.ones(0, D)}, "is empty", id="rank-0"),
        pytest.param(
            {"u": torch.ones(L, MAX_RANK + 1), "v": torch.ones(MAX_RANK + 1, D)},
            f"rank {MAX_RANK + 1} exceeds the limit {MAX_RANK}",
            id="rank-too-high",
        ),
        pytest.param(
            {"u": torch.full((L, 1), float("nan")), "v": torch.ones(1, D)},
            "NaN or infinite",
            id="nan",
        ),
        pytest.param(
            {"u": torch.ones(L, 1), "v": torch.full((1, D), float("inf"))},
            "NaN or infinite",
            id="inf",
        ),
        pytest.param(
            {"u": torch.ones(L, 1, dtype=torch.long), "v": torch.ones(1, D)},
            "expected a float type",
            id="int64",
        ),
    ],
)
def test_refuses_bad_task_tensors(tensors: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        decode_task(_task_blob(tensors))


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        pytest.param(torch.ones(D), "must be 2-D", id="1d"),
        pytest.param(torch.ones(1, L, D), "must be 2-D", id="3d"),
        pytest.param(torch.full((L, D), float("-inf")), "NaN or infinite", id="inf"),
        pytest.param(torch.ones(L, D, dtype=torch.int32), "expected a float type", id="int32"),
        pytest.param(torch.ones(L, D, dtype=torch.bool), "expected a float type", id="bool"),
        pytest.param(torch.ones(4097, 2), "exceeds the limit 4096", id="too-long"),
    ],
)
def test_refuses_bad_shared_tensor(prompt: torch.Tensor, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        decode_shared(_shared_blob(prompt))


def test_refuses_smaller_max_rank() -> None:
    blob = encode_task(_task(3))
    with pytest.raises(ArtifactError, match="rank 3 exceeds the limit 2"):
        decode_task(blob, max_rank=2)


# --- backbones and fit --------------------------------------------------------------------


def test_refuses_another_backbone() -> None:
    with pytest.raises(BackboneMismatchError, match="trained on backbone 'gpt2-0123456789abcdef'"):
        decode_shared(encode_shared(_shared()), backbone="llama-ffff")
    with pytest.raises(BackboneMismatchError, match="retrain or re-export"):
        decode_task(encode_task(_task()), backbone="llama-ffff")
    with pytest.raises(BackboneMismatchError):
        check_task_fits(_task(backbone="llama-ffff"), _shared())


@pytest.mark.parametrize(
    ("u", "v"),
    [
        pytest.param((L + 1, 1), (1, D), id="length"),
        pytest.param((L, 1), (1, D - 1), id="width"),
    ],
)
def test_refuses_task_not_fitting_its_shared_prompt(u: tuple, v: tuple) -> None:
    blob = _task_blob({"u": torch.ones(u), "v": torch.ones(v)})
    with pytest.raises(
        ArtifactError, match=rf"do not fit shared prompt 'fam' of shape \[L={L}, d={D}\]"
    ):
        decode_task(blob, shared=_shared())


def test_refuses_task_of_another_shared_prompt() -> None:
    with pytest.raises(ArtifactError, match="refers to shared prompt 'other', not 'fam'"):
        check_task_fits(_task(shared="other"), _shared())


# --- names --------------------------------------------------------------------------------

BAD_NAMES = ["../x", "A", "", "a" * 65, "a/b", ".hidden", "a..b", "a b", "qa\n"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_refuses_bad_names(name: str, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="invalid task name"):
        check_name(name, "task name")
    with pytest.raises(ArtifactError, match="invalid task name"):
        encode_task(_task(name=name))
    with pytest.raises(ArtifactError, match="invalid shared prompt id"):
        save_shared(tmp_path, _shared(id=name))
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("name", ["../x", "A"])
def test_refuses_bad_names_inside_blobs(name: str) -> None:
    with pytest.raises(ArtifactError, match="invalid task name"):
        decode_task(_task_blob(name=name))
    with pytest.raises(ArtifactError, match="invalid shared prompt id"):
        decode_shared(_shared_blob(id=name))


@pytest.mark.parametrize("name", ["a", "0", "t5-base.qa_v2", "a" * 64])
def test_accepts_good_names(name: str) -> None:
    assert check_name(name) == name


# --- files --------------------------------------------------------------------------------


def test_artifact_dir_refuses_task_without_its_shared_prompt(tmp_path: Path) -> None:
    save_task(tmp_path, _task())
    (tmp_path / "shared").mkdir()
    with pytest.raises(ArtifactError, match="needs shared prompt 'fam', which is not in"):
        load_artifact_dir(tmp_path)


def test_artifact_dir_refuses_missing_dir_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact_dir(tmp_path / "nope")
    save_shared(tmp_path, _shared())
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match=r"bad\.safetensors: not a safetensors blob"):
        load_artifact_dir(tmp_path)


def test_artifact_dir_refuses_other_backbone(tmp_path: Path) -> None:
    save_shared(tmp_path, _shared())
    with pytest.raises(BackboneMismatchError, match=r"fam\.safetensors"):
        load_artifact_dir(tmp_path, backbone="t5-0000")


def test_load_missing_file_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read artifact"):
        load_shared(tmp_path / "missing.safetensors")


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "tasks" / "qa.safetensors"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["qa.safetensors"]
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a server running as another user


def test_artifact_dir_refuses_file_named_after_another_artifact(tmp_path: Path) -> None:
    save_shared(tmp_path, _shared())
    save_task(tmp_path, _task())
    (tmp_path / "tasks" / "qa.safetensors").rename(tmp_path / "tasks" / "other.safetensors")
    with pytest.raises(ArtifactError, match="holds task name 'qa'; the file must be named qa"):
        load_artifact_dir(tmp_path)


@pytest.mark.parametrize("field", ["backbone", "created"])
def test_encode_refuses_what_decode_would_refuse(field: str) -> None:
    with pytest.raises(ArtifactError, match=f"{field} must be a non-empty string"):
        encode_shared(_shared(**{field: ""}))
    with pytest.raises(ArtifactError, match=f"{field} must be a non-empty string"):
        encode_task(_task(**{field: ""}))


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "qa.safetensors"
    write_atomic(path, b"old")

    def fail(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["qa.safetensors"]
