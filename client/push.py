"""``push``: make a server serve a trainer output directory — shared prompts first, then
tasks; each one created, replaced (its tensors differ) or left as it is.

Blobs go up byte for byte (base64), so the server checks their backbone fingerprint; nothing
here needs torch.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from client.artifacts import LocalArtifact, read_artifact_dir, same_tensors
from client.errors import NotFoundError, error_from
from client.tasks import BATCH_SIZE

if TYPE_CHECKING:
    from client.sync import Client

CREATE, REPLACE, UNCHANGED = "create", "replace", "unchanged"


@dataclass
class Change:
    kind: str  # "shared" or "task"
    name: str
    action: str  # create | replace | unchanged
    version: int | None = None  # the server's version after the push (None on a dry run)

    def line(self, dry_run: bool) -> str:
        verb = {CREATE: "create", REPLACE: "replace", UNCHANGED: "unchanged"}[self.action]
        if not dry_run and self.action != UNCHANGED:
            verb = {CREATE: "created", REPLACE: "replaced"}[self.action]
        what = "shared prompt" if self.kind == "shared" else "task"
        version = f" (version {self.version})" if self.version is not None else ""
        note = ""
        if self.kind == "shared" and self.action == REPLACE:
            note = ": every task over it composes with the new prompt"
        return f"{verb:<10} {what} {self.name}{version}{note}"


@dataclass
class PushReport:
    url: str
    directory: Path
    dry_run: bool
    changes: list[Change] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(c.action == action for c in self.changes)

    def summary(self) -> str:
        lines = [c.line(self.dry_run) for c in self.changes]
        head = "would push" if self.dry_run else "pushed"
        lines.append(
            f"{head} {self.directory} to {self.url}: {self.count(CREATE)} new, "
            f"{self.count(REPLACE)} replaced, {self.count(UNCHANGED)} unchanged"
            + (" (dry run: nothing written)" if self.dry_run else "")
        )
        return "\n".join(lines)


def _shared_action(client: Client, art: LocalArtifact) -> str:
    try:
        remote = client.shared_prompts.get(art.name, include_blob=True)
    except NotFoundError:
        return CREATE
    same = remote.blob is not None and same_tensors(art.blob, base64.b64decode(remote.blob))
    return UNCHANGED if same else REPLACE


def _task_action(client: Client, art: LocalArtifact) -> str:
    try:
        remote = client.tasks.get(art.name, include_factors=True)
    except NotFoundError:
        return CREATE
    same = (
        remote.shared == art.shared
        and remote.factors is not None
        and same_tensors(art.blob, base64.b64decode(remote.factors))
    )
    return UNCHANGED if same else REPLACE


def _apply(client: Client, art: LocalArtifact, action: str) -> int | None:
    if action == UNCHANGED:
        return None
    if art.kind == "shared":
        if action == CREATE:
            return client.shared_prompts.create(blob=art.blob).version
        return client.shared_prompts.replace(art.name, blob=art.blob).version
    if action == CREATE:
        return client.tasks.create(art.name, factors=art.blob).version
    return client.tasks.replace(art.name, factors=art.blob).version


def push(client: Client, artifact_dir: str | Path, *, dry_run: bool = False) -> PushReport:
    """Upload what differs; ``dry_run`` only compares. Raises ``APIError`` on the first
    refusal (e.g. a backbone mismatch): what was pushed before it stays (with the tasks of
    its batch that were valid)."""
    local = read_artifact_dir(artifact_dir)
    report = PushReport(client.base_url, Path(artifact_dir), dry_run)
    for art in local.shared:
        change = Change("shared", art.name, _shared_action(client, art))
        if not dry_run:
            change.version = _apply(client, art, change.action)
        report.changes.append(change)
    if dry_run:
        for art in local.tasks:
            report.changes.append(Change("task", art.name, _task_action(client, art)))
        return report
    # New tasks go up through POST /v1/tasks:batch, BATCH_SIZE per request (a directory of a
    # million tasks is 2,000 requests, not a million); only the names that already exist
    # (409) are compared with the server's copy and replaced one by one.
    for start in range(0, len(local.tasks), BATCH_SIZE):
        chunk = local.tasks[start : start + BATCH_SIZE]
        created = client.tasks.create_many(
            ({"name": art.name, "factors": art.blob} for art in chunk), batch_size=BATCH_SIZE
        )
        for art, item in zip(chunk, created, strict=True):
            if item.ok:
                assert item.task is not None
                report.changes.append(Change("task", art.name, CREATE, item.task.version))
                continue
            if item.status != 409 or (item.error or {}).get("code") != "conflict":
                raise error_from(item.status, {"error": item.error})
            change = Change("task", art.name, _task_action(client, art))
            change.version = _apply(client, art, change.action)
            report.changes.append(change)
    return report
