"""The web console (/console) in a real browser: Debian's chromium driven by Playwright, against
a real ``rankone serve`` on a tiny chat Llama with its embedded fine-tuning worker.

Each test signs in with a key and does what a user does: find a task, chat with two models side
by side, upload a file with a bad line, fine-tune a task to completion and read its loss chart,
and see only its own namespace with a scoped key. The screenshots of docs/console.md are taken
here (docs/images/console-*.png, desktop and phone width) and written to the docs only with
``RANKONE_SHOTS=docs`` (``RANKONE_SHOTS=docs pytest tests/service/test_console.py``); otherwise to
a temporary folder, so a test run leaves the work tree as it was.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from prompts import Backbone, load_backbone
from tests.gguf_files import build_tiny_tied_llama
from tests.service.conftest import (
    ADMIN,
    ADMIN_KEY,
    CLIENT,
    CLIENT_KEY,
    ROOT,
    ServerProcess,
    server_env,
    shared_body,
    shared_prompt,
    task_body,
)

CHROMIUM = Path("/usr/bin/chromium")
SCOPED_KEY = "team-secret"
TASKS = ["alpha", "beta", "team-a-summary", "team-a-title"]
IMAGES = ROOT / "docs" / "images"
SCRATCH = Path(tempfile.gettempdir()) / f"rankone-console-shots-{os.getpid()}"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
SHOTS = ("sign-in", "tasks", "task", "playground", "upload-error", "job")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TRAIN = [{"input": f"word {w}", "target": "yes"} for w in "abcdefgh"]


def jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Backbone]:
    path = build_tiny_tied_llama(tmp_path_factory.mktemp("console-llama") / "llama", seed=3)
    return path, load_backbone(path)


@pytest.fixture(scope="module")
def server(
    chat_llama: tuple[Path, Backbone], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    path, bb = chat_llama
    root = tmp_path_factory.mktemp("console")
    env = server_env(
        path,
        data_dir=root / "data",
        admin_keys=f"{ADMIN_KEY},{SCOPED_KEY}:team-a-*",
        max_new_tokens_limit=32,
        finetune_lease_s=10,
    )
    server = ServerProcess(env, root / "server.log").start()
    try:
        with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as c:
            c.post("/v1/shared-prompts", json=shared_body(shared_prompt(bb))).raise_for_status()
            for seed, name in enumerate(TASKS):
                body = task_body(bb, name, seed=seed, description=f"the {name} task")
                c.post("/v1/tasks", json=body).raise_for_status()
            # a second version, so the task page has a version history to show
            again = task_body(bb, "alpha", seed=9, description="alpha, retrained")
            c.put("/v1/tasks/alpha", json={**again, "name": None}).raise_for_status()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "the console tests need Debian's chromium: make system-deps"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, errors  # no uncaught exception in the console's scripts


def sign_in(page: Any, server: ServerProcess, key: str) -> None:
    page.goto(f"{server.url}/")  # redirects to /console/
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("navigation", name="Console").wait_for()
    assert key not in page.url
    assert page.evaluate("sessionStorage.getItem('rankone.key')") == key


def shoot(page: Any, name: str) -> None:
    """docs/images/console-<name>-desktop.png and -phone.png (the same page at 390 px), after
    checking that every form control on the page has a label."""
    unlabelled = page.evaluate(
        "[...document.querySelectorAll('input, select, textarea')]"
        ".filter((e) => !e.labels.length && !e.getAttribute('aria-label')).map((e) => e.id)"
    )
    assert not unlabelled, f"{name}: controls without a label: {unlabelled}"
    folder = IMAGES if os.environ.get("RANKONE_SHOTS") == "docs" else SCRATCH
    folder.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(folder / f"console-{name}-desktop.png"))
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(100)
    wide = page.evaluate("document.documentElement.scrollWidth")
    assert wide <= PHONE["width"], f"{name}: the page is {wide} px wide at phone width"
    page.screenshot(path=str(folder / f"console-{name}-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


def test_sign_in_find_a_task_and_read_its_page(page: Any, server: ServerProcess) -> None:
    page.goto(f"{server.url}/console/")
    page.get_by_label("API key").fill("wrong-key")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").filter(has_text="invalid API key").wait_for()
    shoot(page, "sign-in")

    sign_in(page, server, ADMIN_KEY)
    table = page.get_by_role("table")
    for name in TASKS:
        table.get_by_role("link", name=name, exact=True).wait_for()
    page.get_by_label("Search task names").fill("team")
    page.get_by_label("Search task names").press("Enter")
    page.get_by_text("Tasks 1–2 of 2 matching “team”").first.wait_for()
    assert table.get_by_role("link").all_inner_texts() == ["team-a-summary", "team-a-title"]
    page.get_by_label("Search task names").fill("")
    page.get_by_role("button", name="Search").click()
    page.get_by_text("Tasks 1–4 of 4").first.wait_for()
    shoot(page, "tasks")

    page.get_by_role("link", name="alpha", exact=True).click()
    page.get_by_role("heading", name="alpha", exact=True).wait_for()
    prompt = page.get_by_role("region", name="Prompt", exact=True)
    assert "family" in prompt.inner_text() and "Rank r\n1" in prompt.inner_text()
    versions = page.get_by_role("region", name="Versions", exact=True).get_by_role("row")
    assert versions.count() == 3  # header, version 2 (current), version 1
    assert "2 (current)" in versions.nth(1).inner_text()
    assert "the alpha task" in versions.nth(2).inner_text()
    assert "Requests" in page.get_by_role("region", name="Traffic", exact=True).inner_text()
    shoot(page, "task")


def answers(page: Any) -> list[str]:
    logs = page.get_by_role("log")
    page.wait_for_function(
        "() => document.querySelectorAll('.transcript li.assistant').length === 2 && "
        "!document.querySelector('.transcript [aria-busy]')"
    )
    return [logs.nth(i).locator("li.assistant p").inner_text() for i in range(2)]


def test_playground_chats_with_two_models_side_by_side(page: Any, server: ServerProcess) -> None:
    sign_in(page, server, CLIENT_KEY)
    models = [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=CLIENT).json()["data"]]
    right = "base" if "base" in models else "beta"
    page.goto(f"{server.url}/console/#/playground?left=alpha&right={right}")
    assert page.get_by_label("Model (left)").input_value() == "alpha"
    assert page.get_by_label("Model (right)").input_value() == right
    page.get_by_text("System message and parameters").click()
    page.get_by_label("max_tokens").fill("8")
    message = page.get_by_label("Message", exact=True)
    message.fill("the quick brown fox")
    message.press("Enter")
    got = answers(page)
    for model, text in zip(["alpha", right], got, strict=True):
        want = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers=CLIENT,
            json={
                "model": model,
                "messages": [{"role": "user", "content": "the quick brown fox"}],
                "max_tokens": 8,
                "temperature": 0,
            },
        ).json()["choices"][0]["message"]["content"]
        assert text == (want or "(empty answer)")  # streamed = what the API answers at once
    assert page.locator(".usage").first.inner_text().endswith("generated tokens · finish: length")
    shoot(page, "playground")

    # the traffic of the task page counts the chat (the server's own /metrics)
    page.get_by_role("button", name="Log out").click()
    assert page.evaluate("sessionStorage.getItem('rankone.key')") is None
    sign_in(page, server, ADMIN_KEY)
    page.goto(f"{server.url}/console/#/tasks/alpha")
    traffic = page.get_by_role("region", name="Traffic", exact=True)
    traffic.get_by_text("Generated tokens").wait_for()
    counts = dict(
        zip(
            traffic.locator("dt").all_inner_texts(),
            traffic.locator("dd").all_inner_texts(),
            strict=True,
        )
    )
    assert int(counts["Requests"]) >= 2 and int(counts["Generated tokens"]) >= 16


def test_upload_a_bad_file_then_fine_tune_a_task(
    page: Any, server: ServerProcess, tmp_path: Path
) -> None:
    sign_in(page, server, ADMIN_KEY)
    page.get_by_role("link", name="Fine-tuning").click()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(TRAIN[:1]) + b'{"input": "x"\n' + jsonl(TRAIN[1:3]) + b'{"input": 1}\n')
    page.get_by_label("File", exact=True).set_input_files(str(bad))
    page.get_by_role("button", name="Upload").click()
    problems = page.locator(".problems li")
    problems.first.wait_for()
    lines = problems.all_inner_texts()
    assert len(lines) == 2, lines
    assert lines[0].startswith("line 2: not valid JSON") and lines[1].startswith("line 5:")
    shoot(page, "upload-error")

    valid = tmp_path / "valid.jsonl"
    valid.write_bytes(jsonl(TRAIN[:3]))
    good = tmp_path / "train.jsonl"
    good.write_bytes(jsonl(TRAIN))
    for path, examples in ((valid, 3), (good, 8)):  # the last upload becomes the training file
        page.get_by_label("File", exact=True).set_input_files(str(path))
        page.get_by_role("button", name="Upload").click()
        page.get_by_text(f"Uploaded {path.name}: {examples} examples").wait_for()
    valid_id = page.locator("#job-validation option", has_text="valid.jsonl").get_attribute("value")
    page.get_by_label("Validation file").select_option(valid_id)
    page.get_by_label("New task name").fill("says-yes")
    page.get_by_label("Steps (overrides epochs)").fill("24")
    page.get_by_label("Batch size", exact=True).fill("4")
    page.get_by_label("Validate every N steps").fill("6")
    page.get_by_label("Seed", exact=True).fill("1")
    page.get_by_role("button", name="Create job").click()
    page.get_by_role("heading", name="Job ftjob-").wait_for()
    page.locator("#job-status").filter(has_text="succeeded").wait_for(timeout=120_000)

    chart = page.get_by_role("img", name="Loss chart")
    label = chart.get_attribute("aria-label") or ""
    assert "train loss" in label and "validation loss" in label, label
    train = chart.locator("path[data-series='train loss']").get_attribute("d") or ""
    assert train.count("L") >= 2  # a line through three points at least
    assert page.get_by_role("list", name="Job events, newest first").locator("li").count() > 3
    shoot(page, "job")

    page.get_by_role("link", name="Open says-yes in the playground").click()
    assert page.get_by_label("Model (left)").input_value() == "says-yes"

    # a long job, cancelled from its page
    with httpx.Client(base_url=server.url, headers=ADMIN) as c:
        file_id = c.get("/v1/files").json()["data"][0]["id"]
        body = {"model": "family", "training_file": file_id, "suffix": "never-done"}
        job = c.post("/v1/fine_tuning/jobs", json={**body, "hyperparameters": {"steps": 5000}})
    page.goto(f"{server.url}/console/#/fine-tuning/{job.json()['id']}")
    page.get_by_role("button", name="Cancel job").click()
    page.locator("#job-status").filter(has_text="cancelled").wait_for()
    assert page.get_by_role("button", name="Cancel job").count() == 0


def test_a_scoped_key_sees_only_its_namespace(page: Any, server: ServerProcess) -> None:
    sign_in(page, server, SCOPED_KEY)
    table = page.get_by_role("table")
    table.get_by_role("link", name="team-a-summary").wait_for()
    assert table.get_by_role("link").all_inner_texts() == ["team-a-summary", "team-a-title"]
    page.goto(f"{server.url}/console/#/tasks/alpha")
    page.get_by_role("alert").filter(has_text="403 forbidden").wait_for()
    page.goto(f"{server.url}/console/#/playground")
    page.get_by_label("Model (left)").wait_for()
    options = page.get_by_label("Model (left)").locator("option").all_text_contents()
    assert "alpha" not in options and "team-a-summary" in options


def test_console_files_carry_a_content_security_policy(server: ServerProcess) -> None:
    r = httpx.get(f"{server.url}/console/")
    assert r.status_code == 200 and "Sign in" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert (
        httpx.get(f"{server.url}/console/js/app.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )
    assert httpx.get(f"{server.url}/", follow_redirects=False).headers["location"] == "/console/"
    missing = httpx.get(f"{server.url}/console/js/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"]


def test_the_docs_show_the_screenshots_this_module_takes() -> None:
    shown = set(re.findall(r"images/(console-[\w-]+\.png)", (ROOT / "docs/console.md").read_text()))
    taken = {f"console-{n}-{w}.png" for n in SHOTS for w in ("desktop", "phone")}
    assert shown and shown <= taken, shown - taken
    assert {p.name for p in IMAGES.glob("console-*.png")} <= taken  # no stale image is left
