"""Files and fine-tuning jobs: ``client.files``, ``client.fine_tuning.jobs`` and the worker
protocol ``client.fine_tuning.worker`` (sync and async; answers are the server's JSON dicts).

    file = c.files.create("train.jsonl")                  # purpose fine-tune
    job = c.fine_tuning.jobs.create(model="mpt", training_file=file["id"], suffix="my-task")
    job = c.fine_tuning.jobs.wait(job["id"])               # until succeeded/failed/cancelled
    c.generate(job["fine_tuned_model"], "some input")
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote

from client.errors import RankoneError

if TYPE_CHECKING:
    from client.aio import AsyncClient
    from client.sync import Client

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
FileInput = str | Path | bytes | IO[bytes]


def _upload(file: FileInput, filename: str | None) -> tuple[str, bytes]:
    if isinstance(file, (str, Path)):
        path = Path(file)
        return filename or path.name, path.read_bytes()
    if isinstance(file, bytes):
        return filename or "upload.jsonl", file
    return filename or Path(getattr(file, "name", "upload.jsonl")).name, file.read()


def _job_path(job_id: str, tail: str = "") -> str:
    return f"/v1/fine_tuning/jobs/{quote(job_id, safe='')}{tail}"


def job_body(
    model: str, training_file: str, *, suffix: str | None = None, **options: Any
) -> dict[str, Any]:
    """``options``: validation_file, hyperparameters (n_epochs, batch_size,
    learning_rate_multiplier, steps), seed, metadata, rankone (mode, instruction, shots, replace, eval_every)."""
    body = {"model": model, "training_file": training_file, "suffix": suffix, **options}
    return {k: v for k, v in body.items() if v is not None}


class JobTimeoutError(RankoneError):
    """``jobs.wait`` gave up before the job finished."""


class Files:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self, file: FileInput, *, purpose: str = "fine-tune", filename: str | None = None
    ) -> dict[str, Any]:
        """Upload a JSONL file (a path, bytes or a binary file object)."""
        name, content = _upload(file, filename)
        return dict(
            self._client.request_json(
                "POST", "/v1/files", files={"file": (name, content)}, data={"purpose": purpose}
            )
        )

    def list(self) -> list[dict[str, Any]]:
        return list(self._client.request_json("GET", "/v1/files")["data"])

    def get(self, file_id: str) -> dict[str, Any]:
        return dict(self._client.request_json("GET", f"/v1/files/{quote(file_id, safe='')}"))

    def content(self, file_id: str) -> bytes:
        return self._client.request("GET", f"/v1/files/{quote(file_id, safe='')}/content").content

    def delete(self, file_id: str) -> None:
        self._client.request("DELETE", f"/v1/files/{quote(file_id, safe='')}")


class Jobs:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, model: str, training_file: str, **options: Any) -> dict[str, Any]:
        """A new job (status queued); see ``job_body`` for the options."""
        body = job_body(model, training_file, **options)
        return dict(self._client.request_json("POST", "/v1/fine_tuning/jobs", json=body))

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self._client.request_json("GET", _job_path(job_id)))

    def list(self, *, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        return dict(self._client.request_json("GET", "/v1/fine_tuning/jobs", params=params))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._client.request_json("POST", _job_path(job_id, "/cancel")))

    def events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        """Newest first, as OpenAI lists them."""
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        return dict(self._client.request_json("GET", _job_path(job_id, "/events"), params=params))

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll until the job succeeded, failed or was cancelled; returns the job."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise JobTimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll_s)


class WorkerProtocol:
    """What ``rankone worker`` calls (admin key): claim, renew, progress, result, failure."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def claim(
        self, worker: str, *, lease_s: float | None = None, backbone: str | None = None
    ) -> dict[str, Any] | None:
        """The oldest queued job under a new lease (``job``, ``lease_token``, ``lease_s``,
        ``shared_prompt`` base64), or None when nothing is queued."""
        body = {"worker": worker, "lease_s": lease_s, "backbone": backbone}
        response = self._client.request(
            "POST", "/v1/fine_tuning/claims", json={k: v for k, v in body.items() if v is not None}
        )
        return None if response.status_code == 204 else dict(response.json())

    def renew(self, job_id: str, lease_token: str) -> dict[str, Any]:
        """Extend the lease; ``ConflictError`` (409) when it is lost: stop working on the job."""
        body = {"lease_token": lease_token}
        return dict(self._client.request_json("POST", _job_path(job_id, "/lease"), json=body))

    def progress(self, job_id: str, lease_token: str, events: list[dict[str, Any]]) -> None:
        """Events: ``step``, ``total_steps``, ``train_loss``, ``valid_loss``, ``valid_accuracy``,
        ``message``."""
        body = {"lease_token": lease_token, "events": events}
        self._client.request("POST", _job_path(job_id, "/progress"), json=body)

    def result(
        self,
        job_id: str,
        lease_token: str,
        factors: str,
        metrics: dict[str, Any] | None = None,
        *,
        shared_prompt: str | None = None,
    ) -> dict[str, Any]:
        """Register the trained task (``factors``: base64 task blob; ``shared_prompt``: the
        base64 shared-prompt blob it composes with when the job made its own); returns the job."""
        body = {"lease_token": lease_token, "factors": factors, "metrics": metrics or {}}
        if shared_prompt is not None:
            body["shared_prompt"] = shared_prompt
        return dict(self._client.request_json("POST", _job_path(job_id, "/result"), json=body))

    def failure(
        self, job_id: str, lease_token: str, message: str, *, code: str = "worker_error"
    ) -> dict[str, Any]:
        body = {"lease_token": lease_token, "message": message[:4000], "code": code}
        return dict(self._client.request_json("POST", _job_path(job_id, "/failure"), json=body))


class FineTuning:
    def __init__(self, client: Client) -> None:
        self.jobs = Jobs(client)
        self.worker = WorkerProtocol(client)


class AsyncFiles:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self, file: FileInput, *, purpose: str = "fine-tune", filename: str | None = None
    ) -> dict[str, Any]:
        name, content = _upload(file, filename)
        return dict(
            await self._client.request_json(
                "POST", "/v1/files", files={"file": (name, content)}, data={"purpose": purpose}
            )
        )

    async def list(self) -> list[dict[str, Any]]:
        return list((await self._client.request_json("GET", "/v1/files"))["data"])

    async def get(self, file_id: str) -> dict[str, Any]:
        return dict(await self._client.request_json("GET", f"/v1/files/{quote(file_id, safe='')}"))

    async def content(self, file_id: str) -> bytes:
        path = f"/v1/files/{quote(file_id, safe='')}/content"
        return (await self._client.request("GET", path)).content

    async def delete(self, file_id: str) -> None:
        await self._client.request("DELETE", f"/v1/files/{quote(file_id, safe='')}")


class AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(self, model: str, training_file: str, **options: Any) -> dict[str, Any]:
        body = job_body(model, training_file, **options)
        return dict(await self._client.request_json("POST", "/v1/fine_tuning/jobs", json=body))

    async def get(self, job_id: str) -> dict[str, Any]:
        return dict(await self._client.request_json("GET", _job_path(job_id)))

    async def list(self, *, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        return dict(await self._client.request_json("GET", "/v1/fine_tuning/jobs", params=params))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(await self._client.request_json("POST", _job_path(job_id, "/cancel")))

    async def events(
        self, job_id: str, *, after: str | None = None, limit: int = 20
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        path = _job_path(job_id, "/events")
        return dict(await self._client.request_json("GET", path, params=params))

    async def wait(
        self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 1.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise JobTimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            await asyncio.sleep(poll_s)


class AsyncFineTuning:
    def __init__(self, client: AsyncClient) -> None:
        self.jobs = AsyncJobs(client)
