"""The client against a real server: registry from tensors and lists, paging, typed errors,
generate and stream (sync and async)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest
import torch

from client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from prompts import Backbone
from tests.service.conftest import CLIENT_KEY, ROOT, ServerProcess

L = 6


def _register(admin: Client, t5: Backbone, sid: str, names: list[str]) -> None:
    g = torch.Generator().manual_seed(0)
    admin.shared_prompts.create(id=sid, prompt=torch.randn(L, t5.dim, generator=g))
    for i, name in enumerate(names):
        u = torch.randn(L, 1, generator=g) * 2  # [L, 1]
        v = torch.randn(1, t5.dim, generator=g)  # [1, d]
        admin.tasks.create(name, shared=sid, u=u, v=v, parameters={"max_new_tokens": 3 + i})


def test_shared_prompt_from_tensor_gets_the_servers_fingerprint(admin: Client, t5: Backbone):
    info = admin.shared_prompts.create(id="tensor-sp", prompt=torch.zeros(L, t5.dim) + 0.5)
    assert (info.id, info.length, info.dim, info.version) == ("tensor-sp", L, t5.dim, 1)
    assert info.backbone == t5.fingerprint == admin.info()["backbone"]["fingerprint"]
    assert [s.id for s in admin.shared_prompts.list()].count("tensor-sp") == 1
    with pytest.raises(ConflictError) as e:
        admin.shared_prompts.create(id="tensor-sp", prompt=[[0.5] * t5.dim] * L)
    assert "PUT /v1/shared-prompts/tensor-sp" in e.value.message
    again = admin.shared_prompts.replace("tensor-sp", prompt=[[0.25] * t5.dim] * L)
    assert again.version == 2


def test_wrong_backbone_in_json_is_refused(admin: Client, t5: Backbone):
    with pytest.raises(ConflictError) as e:
        admin.shared_prompts.create(id="other-bb", prompt=[[1.0] * t5.dim] * L, backbone="abc")
    assert (e.value.status, e.value.code) == (409, "backbone_mismatch")


def test_tasks_crud_and_paged_listing(admin: Client, t5: Backbone):
    names = ["page-a", "page-b", "page-c"]
    _register(admin, t5, "page-sp", names)
    listed = [t.name for t in admin.tasks.list(page_size=2)]
    assert set(names) <= set(listed) and len(listed) == len(set(listed))
    got = admin.tasks.get("page-b", include_factors=True)
    assert (got.shared, got.rank, got.length, got.dim) == ("page-sp", 1, L, t5.dim)
    assert got.parameters == {"max_new_tokens": 4} and got.u is not None and len(got.u) == L
    # PUT keeps the default parameters the body leaves out; flat rank-one factors are fine
    replaced = admin.tasks.replace("page-b", shared="page-sp", u=[1.0] * L, v=[0.1] * t5.dim)
    assert (replaced.version, replaced.parameters) == (2, {"max_new_tokens": 4})
    cleared = admin.tasks.replace(
        "page-b", shared="page-sp", u=[1.0] * L, v=[0.1] * t5.dim, parameters={}
    )
    assert cleared.parameters == {}
    admin.tasks.delete("page-b")
    with pytest.raises(NotFoundError) as e:
        admin.tasks.get("page-b")
    assert e.value.status == 404


def test_create_many_sends_batches_and_reports_each_task(admin: Client, t5: Backbone):
    g = torch.Generator().manual_seed(1)
    admin.shared_prompts.create(id="many-sp", prompt=torch.randn(L, t5.dim, generator=g))
    tasks = [
        {"name": f"many-{i}", "shared": "many-sp", "u": torch.randn(L, 1), "v": torch.ones(t5.dim)}
        for i in range(5)
    ]
    tasks[3]["v"] = [1.0] * (t5.dim + 1)  # does not fit the shared prompt
    items = admin.tasks.create_many(tasks, batch_size=2)  # 3 requests
    assert [i.name for i in items] == [t["name"] for t in tasks]
    assert [i.status for i in items] == [201, 201, 201, 422, 201]
    assert items[0].ok and items[0].task is not None and items[0].task.version == 1
    assert items[3].error is not None and items[3].error["code"] == "invalid_artifact"
    assert "many-3" not in {t.name for t in admin.tasks.list()}
    again = asyncio.run(_create_many_async(admin.base_url, tasks[:1]))
    assert again[0].status == 409 and again[0].error is not None
    with pytest.raises(ValueError):
        admin.tasks.create_many(tasks, batch_size=1001)


async def _create_many_async(url: str, tasks: list[dict[str, object]]) -> list[Any]:
    from tests.service.conftest import ADMIN_KEY

    async with AsyncClient(url, key=ADMIN_KEY) as c:
        return await c.tasks.create_many(tasks)


def test_typed_errors_carry_status_code_and_message(
    admin: Client, server: ServerProcess, t5: Backbone
):
    _register(admin, t5, "err-sp", ["err-task"])
    with pytest.raises(ConflictError) as conflict:
        admin.tasks.create("err-task", shared="err-sp", u=[1.0] * L, v=[1.0] * t5.dim)
    assert "PUT /v1/tasks/err-task" in conflict.value.message
    with pytest.raises(InvalidRequestError) as bad:
        admin.tasks.create("err-bad", shared="err-sp", u=[1.0] * 3, v=[1.0] * t5.dim)
    assert bad.value.status == 422
    assert f"expected u [L, r] = [{L}, 1]" in bad.value.message
    with Client(server.url, key="wrong") as anon, pytest.raises(AuthenticationError):
        anon.tasks.get("err-task")
    with Client(server.url, key=CLIENT_KEY) as user:
        with pytest.raises(PermissionDeniedError):
            user.tasks.delete("err-task")
        with pytest.raises(InvalidRequestError) as name:
            user.generate("Bad Name!", "x")
    assert name.value.code == "invalid_name"


def test_generate_and_stream_agree(admin: Client, server: ServerProcess, t5: Backbone):
    _register(admin, t5, "gen-sp", ["gen-task"])
    with Client(server.url, key=CLIENT_KEY) as user:
        batch = user.generate("gen-task", ["abc", "hello"], max_new_tokens=5)
        assert len(batch.texts) == 2 and batch.usage.completion_tokens > 0
        assert batch.outputs[0].finish_reason in {"stop", "length"}
        events = list(user.stream("gen-task", "hello", max_new_tokens=5))
    assert events[-1].event == "done" and events[-1].output is not None
    streamed = "".join(e.text for e in events if e.event == "token")
    assert streamed == events[-1].output.text == batch.texts[1]


def test_async_client(admin: Client, server: ServerProcess, t5: Backbone):
    _register(admin, t5, "async-sp", ["async-a", "async-b"])

    async def run() -> tuple[list[str], str, str]:
        async with AsyncClient(server.url, key=admin_key(admin)) as c:
            names = [t.name async for t in c.tasks.list(page_size=1)]
            gen = await c.generate("async-a", "abc", max_new_tokens=4)
            events = [e async for e in c.stream("async-a", "abc", max_new_tokens=4)]
            with pytest.raises(NotFoundError):
                await c.tasks.get("async-missing")
            return names, gen.texts[0], "".join(e.text for e in events)

    names, text, streamed = asyncio.run(run())
    assert {"async-a", "async-b"} <= set(names)
    assert streamed == text


def admin_key(c: Client) -> str:
    return c._http.headers["Authorization"].removeprefix("Bearer ")


def test_json_use_imports_no_torch(admin: Client, server: ServerProcess, t5: Backbone):
    _register(admin, t5, "notorch-sp", ["notorch"])
    code = (
        "import sys\n"
        "from client import Client\n"
        f"c = Client({server.url!r}, key={admin_key(admin)!r})\n"
        f"c.tasks.create('notorch-json', shared='notorch-sp', u=[1.0] * {L}, v=[0.5] * {t5.dim})\n"
        "print(c.generate('notorch-json', 'abc', max_new_tokens=2).texts)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
