"""Server settings: one pydantic-settings class, read from ``RANKONE_*`` environment variables.

Validated once at start; a bad value stops the server with a message naming the variable.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypedDict

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "RANKONE_"
SECRET_FIELDS = ("client_keys", "admin_keys")  # never echoed in error messages


def _split_keys(value: object) -> object:
    if isinstance(value, str):
        return [k.strip() for k in value.split(",") if k.strip()]
    return value


class Settings(BaseSettings):
    """Every option of the server; the env var is ``RANKONE_<FIELD NAME IN CAPS>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    model: str = Field(
        "", description="backbone: a local model directory, a .gguf file or a hub id"
    )
    served_model_name: str = Field(
        "",
        description="the base model's id in /v1/models (it is also served as 'base'); empty → "
        "the backbone's hub id, or its file or directory name",
    )
    gguf_cache_dir: str = Field(
        "", description="cache of converted .gguf backbones; empty → ~/.cache/rankone/gguf"
    )
    device: str = Field("cpu", description="torch device of the backbone: cpu, cuda, cuda:1, mps")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model dtype")
    redis_url: str = Field(
        "",
        description="Redis URL of the factor store (redis://host:port/db, or a primary under "
        "Sentinel: redis+sentinel://host:port,host:port/<primary name>[/db]); empty → embedded",
    )
    redis_wait_replicas: int = Field(
        -1,
        ge=-1,
        le=16,
        description="replicas that must confirm a write (Redis WAIT) before it is acknowledged "
        "(tasks, shared prompts, fine-tuning files, jobs and their events); "
        "-1: 1 with a redis+sentinel:// URL, else 0",
    )
    redis_wait_ms: int = Field(
        1000, ge=1, le=60_000, description="how long a write waits for those replicas (ms)"
    )
    data_dir: str = Field("./rankone-data", description="directory of the embedded store")
    embedded_max_tasks: int = Field(
        100_000,
        ge=1,
        description="most tasks the embedded store holds (two files each, read at start); "
        "past it a create is refused with 409: use Redis for more",
    )
    seed_dir: str = Field("", description="artifact directory to seed the store from at start")
    engine: Literal["continuous", "static"] = Field(
        "continuous", description="batching engine: continuous (default) or static (baseline)"
    )
    max_batch_size: int = Field(16, ge=1, le=4096, description="rows per forward pass")
    threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="torch threads of the model thread (0: torch's default, the cores or "
        "OMP_NUM_THREADS); other threads run torch single-threaded",
    )
    fused_forward: bool = Field(
        True,
        description="prefill and decode Llama-family backbones with the engine's fused forward "
        "(false: the HF forward)",
    )
    weights: Literal["float32", "int8", "int4", "bfloat16", "float32-packed"] = Field(
        "float32",
        description="decode steps' weights: int8, the fused forward's decoder-layer products "
        "read 8-bit copies (bfloat16 activations); int4, 4-bit copies in blocks of 32 "
        "(llama.cpp's Q4_1 form: a Q4_1 GGUF file's own levels; bfloat16 activations, an 8-bit "
        "lm_head); bfloat16, its decoder-layer and lm_head "
        "products read bfloat16 copies (fast where the CPU has AMX or AVX512-BF16); none is "
        "exact against float32 (see docs/benchmarks.md); float32-packed, float32 products "
        "(decode steps and prefills) read oneDNN's or MKL's packed copies (whichever measures "
        "faster) at the row counts where measured faster (CPU only, about the layers' and "
        "lm_head's weights again in memory); "
        "all need the continuous engine's fused forward",
    )
    cuda_graphs: bool = Field(
        True,
        description="on a CUDA device, the fused forward's decode steps replay CUDA graphs "
        "(one per row count and slot buffers: the engine's decode loop 2.4-4.9x faster on an "
        "H100; a failed capture logs why and decodes eagerly); no effect on a CPU",
    )
    compiled_step: bool = Field(
        False,
        description="on a CPU, the fused forward's decode steps run compiled by inductor "
        "(a lone request decodes 1.3-2.1x faster on SmolLM2, batches of 4-16 rows "
        "0.98-1.17x; with AVX-512 its one-row float32 and bfloat16 products run rankone's own "
        "kernels; needs a C++ compiler; compiles before serving: 2.5-3.5 minutes at the first "
        "start on a machine, ~40 s after, inductor's cache in TORCHINDUCTOR_CACHE_DIR); off by "
        "default",
    )
    cpu_kernels: bool = Field(
        True,
        description="on a CPU with AVX-512, the fused forward's products of 1-8 rows run "
        "rankone's own kernels (built once per machine with g++; shipped built in the CPU "
        "image); false: torch's BLAS and oneDNN products (the kernels' copies of bfloat16 "
        "and 4-bit weights are still made)",
    )
    max_batch_tokens: int = Field(8192, ge=1, description="input tokens per admitted batch")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="wait to fill a batch (ms)")
    max_input_tokens: int = Field(512, ge=1, description="longest accepted input, in tokens")
    max_new_tokens_limit: int = Field(256, ge=1, description="largest accepted max_new_tokens")
    default_max_new_tokens: int = Field(32, ge=1, description="max_new_tokens when not given")
    queue_size: int = Field(256, ge=1, description="waiting requests before 429")
    request_timeout_s: float = Field(60.0, gt=0, description="per-request deadline (→ 504)")
    device_cache_bytes: int = Field(256 * 2**20, ge=0, description="device factor cache size")
    prefix_cache_bytes: int = Field(
        256 * 2**20,
        ge=0,
        description="decoder-only prompt KV-prefix cache size (continuous engine)",
    )
    max_rank: int = Field(64, ge=1, le=1024, description="largest accepted factor rank")
    max_prompt_length: int = Field(1024, ge=1, description="longest accepted shared prompt L")
    max_body_bytes: int = Field(16 * 2**20, ge=1024, description="largest request body")
    client_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated client API keys, each KEY or KEY:PATTERN|PATTERN (scoped "
        "to task names matching a glob, e.g. sk-a:team-a-*); empty → open",
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated admin API keys, each KEY or KEY:PATTERN|PATTERN (writes "
        "only matching tasks); empty → open (warned)",
    )
    docs_open: bool = Field(
        True,
        description="serve /docs, /redoc and /openapi.json without a key; false → they need a "
        "client or admin key whenever keys are configured",
    )
    finetune_max_file_bytes: int = Field(
        8 * 2**20, ge=1024, description="largest accepted fine-tuning file (bytes)"
    )
    finetune_max_examples: int = Field(
        50_000, ge=1, description="most examples in a fine-tuning file / job"
    )
    finetune_max_steps: int = Field(5000, ge=1, description="most optimizer steps per job")
    finetune_base_lr: float = Field(
        0.3, gt=0, description="learning rate of a job with learning_rate_multiplier 1"
    )
    finetune_lease_s: float = Field(
        30.0, gt=0, le=3600, description="job lease a worker must renew (seconds)"
    )
    finetune_max_attempts: int = Field(
        3, ge=1, le=100, description="lease expiries before a job fails"
    )
    finetune_job_timeout_s: float = Field(3600.0, gt=0, description="per-job training time limit")
    finetune_worker: Literal["auto", "off"] = Field(
        "auto",
        description="auto: in embedded mode, start one `rankone worker` child at the first job",
    )
    metrics_task_labels: int = Field(
        100,
        ge=0,
        le=100_000,
        description="tasks that get their own label in the per-task /metrics series (the "
        'first seen since start; later ones count as task="_other"); 0 turns them off',
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")
    log_format: Literal["json", "text"] = Field("json", description="log line format")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port")

    @field_validator("client_keys", "admin_keys", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        return _split_keys(value)

    @field_validator("client_keys", "admin_keys")
    @classmethod
    def _key_entries(cls, value: list[str]) -> list[str]:
        from service.auth import check_entries

        check_entries(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"not a torch device: {value!r}") from e
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(
            ("redis://", "rediss://", "unix://", "redis+sentinel://")
        ):
            raise ValueError(
                "must start with redis://, rediss://, unix:// or redis+sentinel:// (or be empty)"
            )
        if value.startswith("redis+sentinel://"):
            from service.store.redis_connect import parse_sentinel_url

            parse_sentinel_url(value)  # ValueError: says what is wrong
        return value

    @model_validator(mode="after")
    def _model_given(self) -> Settings:
        if not self.model:
            raise ValueError(
                "RANKONE_MODEL is required: a local model directory, a .gguf file or a hub id"
            )
        if self.weights != "float32" and (self.engine != "continuous" or not self.fused_forward):
            raise ValueError(
                f"RANKONE_WEIGHTS={self.weights} runs in the continuous engine's fused forward: "
                "it needs RANKONE_ENGINE=continuous and RANKONE_FUSED_FORWARD=true"
            )
        if self.compiled_step and (self.engine != "continuous" or not self.fused_forward):
            raise ValueError(
                "RANKONE_COMPILED_STEP compiles the continuous engine's fused forward: it needs "
                "RANKONE_ENGINE=continuous and RANKONE_FUSED_FORWARD=true"
            )
        return self

    @property
    def redis_wait(self) -> RedisWait:
        """The Redis backends' write-confirmation arguments (None: chosen from the URL)."""
        replicas = None if self.redis_wait_replicas < 0 else self.redis_wait_replicas
        return {"wait_replicas": replicas, "wait_timeout_ms": self.redis_wait_ms}


class RedisWait(TypedDict):
    wait_replicas: int | None
    wait_timeout_ms: int


class SettingsError(ValueError):
    """Settings that cannot start a server; the message names the environment variables."""


def describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if p != "__root__"]
        var = f"{ENV_PREFIX}{loc[0].upper()}" if loc else "settings"
        got = item.get("input")
        secret = bool(loc) and loc[0] in SECRET_FIELDS
        shown = f" (got {got!r})" if loc and not isinstance(got, dict) and not secret else ""
        msg = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"{var}: {msg}{shown}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with ``overrides`` (CLI flags) on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as e:
        raise SettingsError(describe(e)) from None
