"""``rankone worker``: run the server's fine-tuning jobs on this machine's copy of the backbone.

    rankone worker --url http://server:8000 --key $ADMIN_KEY --model <the server's backbone>

A client of the HTTP API only (``client.Client``; no Redis, no store code): it claims the
oldest queued job under a lease, renews the lease from a keeper thread while the trainer's
``adapt`` stage runs (``trainer/worker_job.py``), posts progress events, and registers the
result through the API. Several workers can share one server (or a fleet of replicas on one
Redis); a worker that dies stops renewing, and its job is handed to another once the lease
expires.

Priority when it shares a machine with the server: on CPU the worker lowers its own priority
(``--nice``, default 10: the kernel gives the server's threads the cores first) and uses
``--threads`` torch threads (default half the cores). On a GPU, give it another device
(``--device cuda:1``) or share one: its kernels then go to the default CUDA stream, which has
the lowest priority, so a serving engine that uses a high-priority stream stays ahead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from client import Client
from client.errors import APIError, RankoneError, TransportError
from prompts import Backbone, load_backbone
from prompts.errors import RankoneError as PromptsError
from trainer.errors import TrainerError
from trainer.worker_job import JobControl, JobRun, Limits

log = logging.getLogger("rankone.worker")


@dataclass
class WorkerOptions:
    """Options of ``rankone worker``."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model",)

    url: str | None = None
    """The server (default $RANKONE_URL, then http://127.0.0.1:8000)."""
    key: str | None = None
    """An admin key of the server (default $RANKONE_WORKER_KEY, then $RANKONE_KEY)."""
    model: str | None = None
    """The backbone, the same weights the server serves (its fingerprint is checked)."""
    device: str = "cpu"
    """Torch device to train on: cpu, cuda, cuda:1, ..."""
    name: str | None = None
    """This worker's name in the job events (default <host>-<pid>)."""
    max_jobs: int = 1
    """Jobs trained at the same time by this worker (each in its own thread)."""
    max_steps: int = 10_000
    """Refuse (fail) a job of more optimizer steps than this."""
    max_examples: int = 100_000
    """Refuse (fail) a job of more training examples than this."""
    max_job_s: float = 3600.0
    """Per-job time limit in seconds (the server's limit applies too; the smaller wins)."""
    poll_s: float = 1.0
    """Seconds between claims while no job is queued."""
    nice: int = 10
    """Added to this process's niceness, so a server on the same CPU keeps priority (0: off)."""
    threads: int | None = None
    """Torch intra-op threads (default: half the cores)."""
    once: bool = False
    """Exit after one job (scripts and benchmarks)."""
    parent_pid: int | None = None
    """Exit when this process (the embedded server that started this worker) is gone."""

    def __post_init__(self) -> None:
        for name in ("max_jobs", "max_steps", "max_examples", "max_job_s", "poll_s"):
            if getattr(self, name) <= 0:
                raise TrainerError(f"option --{name.replace('_', '-')} must be > 0")
        if self.nice < 0:
            raise TrainerError("option --nice must be >= 0 (a worker never raises its priority)")


class LeaseKeeper(threading.Thread):
    """Renews one job's lease every third of its length until told to stop; a 409 (expired and
    reclaimed, or cancelled) stops the job."""

    def __init__(
        self, client: Client, job_id: str, token: str, lease_s: float, control: JobControl
    ) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.client, self.job_id, self.token = client, job_id, token
        self.every = max(0.05, lease_s / 3)
        self.control = control
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            try:
                self.client.fine_tuning.worker.renew(self.job_id, self.token)
            except APIError as e:
                if e.status == 409:
                    self.control.stop("lease_lost", e.message)
                    return
                log.warning("renewing the lease of %s failed: %s", self.job_id, e)
            except TransportError as e:  # keep trying: the lease may still be valid
                log.warning("renewing the lease of %s failed: %s", self.job_id, e)


class Worker:
    def __init__(self, opts: WorkerOptions, client: Client, backbone: Backbone) -> None:
        self.opts, self.client, self.backbone = opts, client, backbone
        self.name = opts.name or f"{socket.gethostname()}-{os.getpid()}"
        self.limits = Limits(opts.max_steps, opts.max_examples, opts.max_job_s)
        self.stopping = threading.Event()
        self.active: dict[str, JobControl] = {}
        self.lock = threading.Lock()
        self.finished = 0

    def shutdown(self, *_: Any) -> None:
        self.stopping.set()
        with self.lock:
            for control in self.active.values():
                control.stop("shutdown", "the worker is shutting down")

    def run_claim(self, claim: dict[str, Any]) -> None:
        job_id = claim["job"]["id"]
        run = JobRun(self.client, self.backbone, claim, device=self.opts.device, limits=self.limits)
        keeper = LeaseKeeper(
            self.client, job_id, claim["lease_token"], float(claim["lease_s"]), run.control
        )
        with self.lock:
            self.active[job_id] = run.control
        keeper.start()
        try:
            outcome = run.run()
            log.info("job %s: %s", job_id, outcome)
        except Exception as e:  # a bug or a resource failure: report it rather than vanish
            log.exception("job %s failed in the worker", job_id)
            with contextlib.suppress(RankoneError):
                self.client.fine_tuning.worker.failure(
                    job_id, claim["lease_token"], f"worker error: {e}"
                )
        finally:
            keeper.done.set()
            with self.lock:
                self.active.pop(job_id, None)
                self.finished += 1

    def claim(self) -> dict[str, Any] | None:
        try:
            return self.client.fine_tuning.worker.claim(
                self.name, backbone=self.backbone.fingerprint
            )
        except APIError as e:
            if e.status in (401, 403, 409):
                raise  # wrong key or wrong backbone: waiting will not fix it
            log.warning("claiming a job failed: %s", e)
        except TransportError as e:
            log.warning("the server is unreachable: %s", e)
        return None

    def loop(self) -> int:
        threads: list[threading.Thread] = []
        while not self.stopping.is_set():
            if self.opts.parent_pid is not None and os.getppid() != self.opts.parent_pid:
                log.warning("the server that started this worker is gone; stopping")
                self.shutdown()
                break
            threads = [t for t in threads if t.is_alive()]
            if self.opts.once and self.finished and not threads:
                break
            claim = None
            if len(threads) < self.opts.max_jobs and not (
                self.opts.once and (threads or self.finished)
            ):
                claim = self.claim()
            if claim is None:
                self.stopping.wait(self.opts.poll_s)
                continue
            log.info(
                "claimed job %s (task %s)", claim["job"]["id"], claim["job"]["rankone"]["task"]
            )
            thread = threading.Thread(target=self.run_claim, args=(claim,), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(timeout=30)
        return 0


def lower_priority(opts: WorkerOptions) -> None:
    if opts.nice:
        os.nice(opts.nice)
    torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 2) // 2))


def main(argv: list[str] | None = None) -> int:
    from trainer.config import parse_options

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per lease renewal otherwise
    try:
        opts = parse_options(
            WorkerOptions, list(sys.argv[1:] if argv is None else argv), "rankone worker",
            "Run the server's fine-tuning jobs (POST /v1/fine_tuning/jobs) on this machine.",
        )  # fmt: skip
        key = opts.key or os.environ.get("RANKONE_WORKER_KEY") or os.environ.get("RANKONE_KEY")
        lower_priority(opts)
        assert opts.model is not None
        backbone = load_backbone(opts.model, device=opts.device)
        client = Client(opts.url, key)
        worker = Worker(opts, client, backbone)
        signal.signal(signal.SIGTERM, worker.shutdown)
        signal.signal(signal.SIGINT, worker.shutdown)
        log.info(
            "worker %s ready (backbone %s, %s)", worker.name, backbone.fingerprint, client.base_url
        )
        return worker.loop()
    except (TrainerError, RankoneError, PromptsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
