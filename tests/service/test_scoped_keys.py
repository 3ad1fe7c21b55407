"""Scoped keys as a route × key matrix: a key limited to ``team-a-*`` uses, lists and (admin)
writes only team-a tasks; unscoped keys keep the all-or-nothing behaviour."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prompts import Backbone
from service.app import create_app
from service.auth import Caller, KeyEntry, Role, authenticate, parse_entry
from service.errors import ApiError
from service.settings import Settings, SettingsError, load_settings
from tests.service.conftest import shared_body, shared_prompt, task_body

KEYS = {
    "admin": "adm-all",
    "admin-a": "adm-a",
    "client": "cli-all",
    "client-a": "cli-a",
    "wrong": "not-a-key",
}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"} if who != "none" else {}


@pytest.fixture(scope="module")
def app_client(
    tiny_t5_dir: Path, tmp_path_factory: pytest.TempPathFactory, t5_backbone: Backbone
) -> Iterator[TestClient]:
    settings = Settings(
        model=str(tiny_t5_dir),
        data_dir=str(tmp_path_factory.mktemp("data")),
        admin_keys=["adm-all", "adm-a:team-a-*|shared-a"],
        client_keys=["cli-all", "cli-a:team-a-*"],
        max_new_tokens_limit=4,
        log_level="WARNING",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        admin = auth("admin")
        assert c.post(
            "/v1/shared-prompts", json=shared_body(shared_prompt(t5_backbone)), headers=admin
        )
        for name in ("team-a-one", "team-b-one"):
            body = task_body(t5_backbone, name, seed=len(name))
            assert c.post("/v1/tasks", json=body, headers=admin).status_code == 201
        yield c


Call = Callable[[TestClient, Backbone, dict[str, str]], Any]


def _create(name: str) -> Call:
    return lambda c, bb, h: c.post("/v1/tasks", json=task_body(bb, name, seed=7), headers=h)


def _replace(name: str) -> Call:
    def call(c: TestClient, bb: Backbone, h: dict[str, str]) -> Any:
        body = {k: v for k, v in task_body(bb, name, seed=8).items() if k != "name"}
        return c.put(f"/v1/tasks/{name}", json=body, headers=h)

    return call


def _generate(name: str) -> Call:
    return lambda c, bb, h: c.post(f"/v1/tasks/{name}/generate", json={"inputs": "x"}, headers=h)


def _complete(name: str) -> Call:
    return lambda c, bb, h: c.post(
        "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2}, headers=h
    )


def _shared(sid: str) -> Call:
    return lambda c, bb, h: c.post(
        "/v1/shared-prompts", json=shared_body(shared_prompt(bb, sid)), headers=h
    )


def _chat(name: str) -> Call:
    body = {"model": name, "messages": [{"role": "user", "content": "x"}]}
    return lambda c, bb, h: c.post("/v1/chat/completions", json=body, headers=h)


ROUTES: dict[str, Call] = {
    "chat team-b": _chat("team-b-one"),  # in scope: 400 (this tiny T5 has no chat template)
    "generate team-a": _generate("team-a-one"),
    "generate team-b": _generate("team-b-one"),
    "complete team-a": _complete("team-a-one"),
    "complete team-b": _complete("team-b-one"),
    "get team-a": lambda c, bb, h: c.get("/v1/tasks/team-a-one", headers=h),
    "get team-b": lambda c, bb, h: c.get("/v1/tasks/team-b-one", headers=h),
    "create team-a": _create("team-a-new"),
    "create team-b": _create("team-b-new"),
    "replace team-a": _replace("team-a-one"),
    "replace team-b": _replace("team-b-one"),
    "delete team-b": lambda c, bb, h: c.delete("/v1/tasks/team-b-one", headers=h),
    "shared in scope": _shared("shared-a"),
    "shared out of scope": _shared("shared-b"),
    "list shared": lambda c, bb, h: c.get("/v1/shared-prompts", headers=h),
    "info": lambda c, bb, h: c.get("/v1/info", headers=h),
}

# Expected status per route for each key (the create / shared rows are 201 once, then 409, so
# only keys that may write them are asked: each row's writer runs once, last).
MATRIX: dict[str, dict[str, int]] = {
    "none": {r: 401 for r in ROUTES},
    "wrong": {r: 401 for r in ROUTES},
    "client": {
        **{r: 403 for r in ROUTES},
        "generate team-a": 200,
        "generate team-b": 200,
        "complete team-a": 200,
        "complete team-b": 200,
        "chat team-b": 400,
        "info": 200,
    },
    "client-a": {
        **{r: 403 for r in ROUTES},
        "generate team-a": 200,
        "complete team-a": 200,
        "info": 200,
    },
    "admin-a": {
        "generate team-a": 200,
        "generate team-b": 403,
        "complete team-a": 200,
        "complete team-b": 403,
        "chat team-b": 403,
        "get team-a": 200,
        "get team-b": 403,
        "create team-a": 201,
        "create team-b": 403,
        "replace team-a": 200,
        "replace team-b": 403,
        "delete team-b": 403,
        "shared in scope": 201,
        "shared out of scope": 403,
        "list shared": 200,
        "info": 200,
    },
}
ORDER = ["none", "wrong", "client", "client-a", "admin-a"]


@pytest.mark.parametrize("who", ORDER)
def test_route_by_key_matrix(app_client: TestClient, t5_backbone: Backbone, who: str) -> None:
    got = {
        route: call(app_client, t5_backbone, auth(who)).status_code
        for route, call in ROUTES.items()
    }
    assert got == MATRIX[who]
    if who == "admin-a":  # nothing of team-b was touched by the scoped admin
        b = app_client.get("/v1/tasks/team-b-one", headers=auth("admin")).json()
        assert b["version"] == 1
        assert app_client.get("/v1/tasks/team-b-new", headers=auth("admin")).status_code == 404


def test_listings_show_only_the_scope(app_client: TestClient) -> None:
    def names(path: str, who: str, key: str) -> set[str]:
        r = app_client.get(path, headers=auth(who))
        assert r.status_code == 200, r.text
        return {item["name" if key == "tasks" else "id"] for item in r.json()[key]}

    assert names("/v1/models", "client-a", "data") == {
        n for n in names("/v1/models", "client", "data") if n.startswith("team-a-")
    }
    assert "team-b-one" in names("/v1/models", "client", "data")
    assert names("/v1/tasks", "admin-a", "tasks") == {
        n for n in names("/v1/tasks", "admin", "tasks") if n.startswith("team-a-")
    }
    page = app_client.get("/v1/tasks", params={"limit": 1}, headers=auth("admin-a")).json()
    assert page["total"] == len(names("/v1/tasks", "admin-a", "tasks"))
    assert len(page["tasks"]) == 1 and page["next_offset"] == (1 if page["total"] > 1 else None)


def test_the_unscoped_admin_may_do_everything(
    app_client: TestClient, t5_backbone: Backbone
) -> None:
    h = auth("admin")
    assert _replace("team-b-one")(app_client, t5_backbone, h).status_code == 200
    assert _generate("team-b-one")(app_client, t5_backbone, h).status_code == 200
    assert app_client.delete("/v1/tasks/team-b-one", headers=h).status_code == 204


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("k1", KeyEntry("k1")),
        ("k1:team-a-*", KeyEntry("k1", ("team-a-*",))),
        (" k1 : team-a-* | exact.name ", KeyEntry("k1", ("team-a-*", "exact.name"))),
    ],
)
def test_parse_entry(entry: str, expected: KeyEntry) -> None:
    assert parse_entry(entry) == expected


@pytest.mark.parametrize("entry", [":team-a-*", "k1:", "k1:Team-A", "k1:a/b"])
def test_bad_entries_stop_the_server_without_echoing_keys(entry: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(model="m", client_keys=f"secret-one,{entry}")
    assert "RANKONE_CLIENT_KEYS" in str(err.value) and "secret-one" not in str(err.value)


def test_caller_check_is_the_one_scope_check() -> None:
    scoped = authenticate(
        "k", Role.CLIENT, client_keys=[KeyEntry("k", ("team-a-*",))], admin_keys=[]
    )
    assert scoped == Caller(Role.CLIENT, ("team-a-*",))
    assert scoped.check("team-a-x") == "team-a-x" and not scoped.allows("team-b-x")
    with pytest.raises(ApiError) as err:
        scoped.check("team-b-x")
    assert err.value.status == 403 and "team-a-*" in err.value.message
    assert authenticate(None, Role.ADMIN, client_keys=[], admin_keys=[]).allows("anything")


@pytest.mark.parametrize(
    ("entries", "position"),
    [
        ("ok-key,sk:live:abc123", 2),  # a ':' inside a key would be swallowed: refused
        ("sk:live:abc123", 1),
        ("ok-key,ok-two,abc:LIVE-Secret", 3),  # what follows ':' may be a secret's tail
        ("abc:def|", 0),  # valid: one pattern
        ("k:" + "a" * 65, 1),
        ("k:team a", 1),
    ],
)
def test_key_syntax_edge_cases_never_print_a_key(entries: str, position: int) -> None:
    if not position:
        assert load_settings(model="m", admin_keys=entries).admin_keys == [entries]
        return
    with pytest.raises(SettingsError) as err:
        load_settings(model="m", admin_keys=entries)
    message = str(err.value)
    assert f"RANKONE_ADMIN_KEYS: entry {position} " in message
    for secret in ("live", "abc123", "LIVE-Secret", "ok-key", "ok-two", "team a"):
        assert secret not in message


def test_scoped_entries_are_logged_at_start_by_position() -> None:
    from service.auth import describe_scopes

    assert describe_scopes(["plain-key", "abc:def", "x:team-a-*|b"]) == [
        "entry 2 is scoped to def",
        "entry 3 is scoped to team-a-*|b",
    ]


def test_a_key_in_both_lists_is_governed_by_the_route_s_list() -> None:
    """The documented rule: on client routes a key's client entry applies (its client scope),
    on admin routes its admin entry."""
    clients = [KeyEntry("both", ("team-a-*",))]
    admins = [KeyEntry("both"), KeyEntry("admin-only", ("team-b-*",))]
    on_client = authenticate("both", Role.CLIENT, client_keys=clients, admin_keys=admins)
    assert on_client == Caller(Role.CLIENT, ("team-a-*",)) and not on_client.allows("team-b-x")
    on_admin = authenticate("both", Role.ADMIN, client_keys=clients, admin_keys=admins)
    assert on_admin == Caller(Role.ADMIN, None)
    only = authenticate("admin-only", Role.CLIENT, client_keys=clients, admin_keys=admins)
    assert only == Caller(Role.ADMIN, ("team-b-*",))


def test_out_of_scope_is_the_same_403_whether_the_task_exists(
    app_client: TestClient, t5_backbone: Backbone
) -> None:
    for who in ("admin-a", "client-a"):
        h = auth(who)
        for call in (_generate, _complete, _replace):
            there = call("team-b-one")(app_client, t5_backbone, h)
            absent = call("team-b-absent")(app_client, t5_backbone, h)
            assert there.status_code == absent.status_code == 403, (who, there.text, absent.text)
            assert there.json()["error"]["message"].replace("team-b-one", "X") == absent.json()[
                "error"
            ]["message"].replace("team-b-absent", "X")
    h = auth("admin-a")
    for path in ("/v1/tasks/team-b-one", "/v1/tasks/team-b-absent"):
        assert app_client.get(path, headers=h).status_code == 403
        assert app_client.delete(path, headers=h).status_code == 403
