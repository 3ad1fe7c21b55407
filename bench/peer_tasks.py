"""The many-task workload of ``bench.peer_llamacpp``: 32 clients over 32 tasks, rankone's server
against ``llama-server`` with the same 32 tasks as LoRA adapters picked per request.

rankone serves 32 rank-one tasks over one shared prompt (L = 16, the demo's length; 592
numbers per task) from its seed directory. llama.cpp serves 32 PEFT LoRA adapters (rank 8 on
``q_proj`` and ``v_proj``, PEFT's default for Llama: 460,800 numbers each), made here with
PEFT and converted by llama.cpp's ``convert_lora_to_gguf.py``, all loaded at start with
``--lora-init-without-apply``; each request names its adapter (``"lora": [{"id": i, "scale":
1}]``), which llama-server does not batch with requests of another adapter (its README says
so). A third run asks llama-server for the base model only (no ``lora``): what its batching
reaches when every request may share a batch.

Each client sends its task's requests one after another (a closed loop, 32 in flight) for
``seconds``, greedy, ``ignore_eos`` and the same number of generated tokens on both sides, the
same prompts (~40 tokens of English words); tokens per second counts every generated token of
the requests that completed. The three runs alternate, ``rounds`` times; medians reported.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import Server

TASKS = 32
LORA_RANK = 8
LORA_MODULES = ("q_proj", "v_proj")  # PEFT's default target modules for Llama
PROMPT_LENGTH = 16  # rankone's soft prompt rows (the demo's L)
WORDS = [
    "the",
    "a",
    "river",
    "city",
    "morning",
    "light",
    "quiet",
    "people",
    "market",
    "old",
    "new",
    "small",
    "bridge",
    "train",
    "road",
    "window",
    "garden",
    "winter",
    "summer",
    "story",
    "letter",
    "friend",
    "music",
    "table",
    "house",
    "night",
    "early",
    "late",
    "green",
    "blue",
    "slow",
    "fast",
    "open",
    "long",
    "short",
    "paper",
    "water",
    "stone",
    "field",
]


def prompts(n: int, words: int = 32, seed: int = 5) -> list[str]:
    """``n`` prompts of ``words`` English words (~40 tokens), the same for both servers."""
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (words,), generator=g))
        for _ in range(n)
    ]


def lora_adapters(tree: Path, hf_dir: Path, out: Path, n: int = TASKS) -> list[Path]:
    """``n`` GGUF LoRA adapters of the model in ``hf_dir`` (made once, kept in ``out``).

    PEFT's ``LoraConfig`` with ``r`` = LORA_RANK on LORA_MODULES; B drawn small (PEFT starts it
    at zero, which a trained adapter is not) so each adapter changes the model."""
    paths = [out / f"lora-{i}.gguf" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(LORA_MODULES))
    peft_model = get_peft_model(model, config)
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    for i, path in enumerate(paths):
        if path.exists():
            continue
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp)
            cmd = [sys.executable, str(tree / "convert_lora_to_gguf.py"), "--base", str(hf_dir)]
            cmd += ["--outtype", "f32", "--outfile", str(path), tmp]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"convert_lora_to_gguf.py failed: {done.stderr[-2000:]}")
    return paths


def lora_numbers(hidden: int, kv: int, layers: int) -> int:
    """Numbers in one adapter: A [r, in] and B [out, r] per target module and layer."""
    per_layer = LORA_RANK * (hidden + hidden) + LORA_RANK * (hidden + kv)  # q_proj, v_proj
    return layers * per_layer


def llama_server(
    bin_dir: Path, model: Path, loras: list[Path], threads: int, slots: int, log: Path
) -> Server:
    """``llama-server`` on 127.0.0.1 with ``loras`` loaded unapplied, ``slots`` parallel
    sequences of 160 positions each; ready when ``/health`` answers 200."""
    cmd = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", "{port}", "-t", str(threads), "-tb", str(threads)]
    cmd += ["-np", str(slots), "-c", str(slots * 160), "--lora-init-without-apply"]
    for path in loras:
        cmd += ["--lora", str(path)]
    return Server({}, log, cmd=cmd, ready="/health")


def rankone_request(i: int, text: str, tokens: int) -> tuple[str, dict[str, Any]]:
    body = {"model": f"task-{i}", "prompt": text, "max_tokens": tokens, "temperature": 0}
    return "/v1/completions", {**body, "ignore_eos": True}


def llama_request(lora: bool) -> Any:
    def request(i: int, text: str, tokens: int) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"prompt": text, "n_predict": tokens, "temperature": 0}
        body.update(ignore_eos=True, cache_prompt=True)
        if lora:
            body["lora"] = [{"id": i, "scale": 1.0}]
        return "/completion", body

    return request


def generated(reply: dict[str, Any]) -> int:
    """Generated tokens of a reply: rankone's usage, llama-server's tokens_predicted."""
    if "usage" in reply:
        return int(reply["usage"]["completion_tokens"])
    return int(reply["tokens_predicted"])


async def closed_loop(
    url: str,
    request: Any,
    texts: list[str],
    tokens: int,
    seconds: float,
    clients: int = TASKS,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, float]:
    """``clients`` clients, client i on task i, each sending its next request when its answer
    is back, for ``seconds`` (requests under way then complete): tokens/s and requests."""
    counts = {"tokens": 0, "requests": 0}
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(
        base_url=url, timeout=900, limits=limits, transport=transport
    ) as http:

        async def one(i: int, text: str) -> int:
            path, body = request(i, text, tokens)
            r = await http.post(path, json=body)
            r.raise_for_status()
            got = generated(r.json())
            if got != tokens:
                raise RuntimeError(f"{url}{path}: {got} tokens generated, {tokens} asked")
            return got

        # warm: every task once (rankone resolves and caches it; llama.cpp its adapter)
        await asyncio.gather(*(one(i, texts[i % len(texts)]) for i in range(clients)))
        start = time.perf_counter()
        deadline = start + seconds

        async def client(i: int) -> None:
            j = i
            while time.perf_counter() < deadline:
                got = await one(i, texts[j % len(texts)])  # (+= await would lose updates)
                counts["tokens"] += got
                counts["requests"] += 1
                j += clients

        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    return {"tok_s": counts["tokens"] / wall, "requests": counts["requests"], "wall_s": wall}


def rankone_server(model: Path, seed: Path, data: Path, threads: int, log: Path) -> Server:
    env = {
        "OMP_NUM_THREADS": str(threads),
        "RANKONE_MODEL": str(model),
        "RANKONE_SEED_DIR": str(seed),
        "RANKONE_DATA_DIR": str(data),
        "RANKONE_ENGINE": "continuous",
        "RANKONE_MAX_BATCH_SIZE": str(TASKS),
        "RANKONE_QUEUE_SIZE": "1024",
        "RANKONE_LOG_LEVEL": "WARNING",
        "RANKONE_REQUEST_TIMEOUT_S": "900",
    }
    return Server(env, log)


def many_tasks(
    backbone: Any,
    model: Path,
    bin_dir: Path,
    tree: Path,
    hf_dir: Path,
    f32: Path,
    work: Path,
    *,
    threads: int,
    seconds: float,
    rounds: int,
    tokens: int,
) -> dict[str, Any]:
    """The workload's figures (medians over ``rounds`` of alternating runs)."""
    from bench.server_bench import seed_dir

    loras = lora_adapters(tree, hf_dir, work / "loras")
    texts = prompts(4 * TASKS)
    config: Any = backbone.model.config
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seed_dir(backbone, root / "seed", TASKS, PROMPT_LENGTH, real=True)
        rankone = rankone_server(model, root / "seed", root / "data", threads, work / "rankone.log")
        llama = llama_server(bin_dir, f32, loras, threads, TASKS, work / "llama-server.log")
        with rankone, llama:
            runs = {
                "rankone_tok_s": (rankone.url, rankone_request),
                "llamacpp_lora_tok_s": (llama.url, llama_request(lora=True)),
                "llamacpp_base_only_tok_s": (llama.url, llama_request(lora=False)),
            }
            for r in range(rounds):
                for key, (url, request) in runs.items():
                    got = asyncio.run(closed_loop(url, request, texts, tokens, seconds))
                    samples.setdefault(key, []).append(got["tok_s"])
                    print(f"[peer] many tasks, round {r + 1}: {key} {got}", flush=True)
    out: dict[str, Any] = {k: round(statistics.median(v), 1) for k, v in samples.items()}
    out["min_max"] = {k: [round(min(v), 1), round(max(v), 1)] for k, v in samples.items()}
    out["rankone_over_llamacpp_lora"] = round(out["rankone_tok_s"] / out["llamacpp_lora_tok_s"], 2)
    out["workload"] = (
        f"{TASKS} clients over {TASKS} tasks, closed loop {seconds:.0f} s x {rounds} rounds "
        f"(alternating), {tokens} tokens generated per request (ignore_eos, greedy), prompts of "
        f"~40 tokens; rankone float32 over rank-one tasks (L = {PROMPT_LENGTH}); llama.cpp F32 "
        f"with {TASKS} LoRA adapters (r = {LORA_RANK} on {', '.join(LORA_MODULES)})"
    )
    out["numbers_per_task"] = {
        "rankone": PROMPT_LENGTH + backbone.dim,
        "llamacpp_lora": lora_numbers(backbone.dim, kv, int(config.num_hidden_layers)),
    }
    return out
