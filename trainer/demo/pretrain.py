"""``pretrain-demo``: build and pretrain a small byte-level T5 backbone for the demo, on CPU.

The demo needs a backbone on which tasks can be reached *through soft prompts only*. So the
backbone is pretrained (full-model training: this is its pretraining, not prompt tuning) as a
multi-task model where the task is signalled by a marker that a soft prompt can stand in for:

- source task k is asked as ``[m_k] * n + input`` where ``m_k`` is one reserved token
  (``<extra_id_k>``) repeated ``n`` times, ``n`` drawn uniformly from 1..``max_marker``;
- the generic corpus (copying) is asked with no marker.

A soft prompt of ``L <= max_marker`` rows that all equal the embedding of ``m_k`` is then
exactly an input the backbone was trained on, and it is representable by MPT with rank one:
with a shared prompt ``P`` whose entries are non-zero, ``u = 1`` and ``v = e(m_k) / p`` give
``P ⊙ (u v) = e(m_k)`` on every row when ``P``'s rows are equal. Prompt tuning only has to
find it (or anything that works as well). The held-out target formats of the offline
benchmark (``TARGET_TASKS``) are never seen here.

    python -m trainer.demo.pretrain --out .rankone/demo/backbone --steps 4000 --minutes 6.3 --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.demo.evaluate import greedy_from_embeds
from trainer.demo.tasks import GENERIC_TASKS, SOURCE_TASKS, Task, generate_examples
from trainer.progress import Progress

PAD, EOS = 0, 1
BYTE_OFFSET = 3  # ByT5: token id = byte + 3
# Relative sampling weight of each source task (default 1): the tasks the backbone learns
# slowest (counting, sorting) get more of the short pretraining budget; min/max letter are
# learnt early (100% marker accuracy at 2,500 steps with uniform weights).
TASK_WEIGHTS = {
    "count": 3.0,
    "sort": 1.75,
    "sort-desc": 1.25,
    "count-vowels": 1.0,
    "min-letter": 0.75,
    "max-letter": 0.75,
}


@dataclass
class PretrainConfig:
    out: str
    steps: int = 4000
    minutes: float = 6.3
    seed: int = 0
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    d_model: int = 128
    d_ff: int = 512
    num_layers: int = 3
    num_heads: int = 4
    max_marker: int = 8
    generic_fraction: float = 0.1
    eval_examples: int = 100
    eval_marker: int = 8
    init_from: str | None = None
    threads: int = int(os.environ.get("OMP_NUM_THREADS") or 2)


def encode_bytes(text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def marker_token_ids(tokenizer, tasks: list[str]) -> dict[str, int]:
    """The reserved token that marks each source task: ``<extra_id_k>`` for the k-th task."""
    ids = tokenizer.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(len(tasks))])
    return dict(zip(tasks, (int(i) for i in ids), strict=True))


def build_model(cfg: PretrainConfig):
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = ByT5Tokenizer()
    config = T5Config(  # type: ignore[call-arg]  # T5Config takes PretrainedConfig's kwargs
        vocab_size=len(tokenizer),
        d_model=cfg.d_model,
        d_kv=cfg.d_model // cfg.num_heads,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        # Untied T5 heads are initialised with std 1 and see RMS-normed states, so the first
        # logits have std ~sqrt(d) (loss ~20 at step 0); start near uniform instead.
        model.lm_head.weight.mul_(cfg.d_model**-0.5)
    return model, tokenizer


class Mixture:
    """An endless, seeded stream of marker-prefixed (source) and plain (generic) examples."""

    def __init__(self, markers: dict[str, int], cfg: PretrainConfig, seed: int):
        self.rng = random.Random(seed)
        self.markers = markers
        self.cfg = cfg
        self.source: list[Task] = [SOURCE_TASKS[name] for name in markers]
        self.weights = [TASK_WEIGHTS.get(name, 1.0) for name in markers]
        self.generic: list[Task] = list(GENERIC_TASKS.values())

    def sample(self) -> tuple[list[int], list[int]]:
        rng = self.rng
        if rng.random() < self.cfg.generic_fraction:
            task = rng.choice(self.generic)
            prefix: list[int] = []
        else:
            task = rng.choices(self.source, self.weights)[0]
            prefix = [self.markers[task.name]] * rng.randint(1, self.cfg.max_marker)
        ex = task.example(rng)
        return prefix + encode_bytes(ex["input"]) + [EOS], [*encode_bytes(ex["target"]), EOS]

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        return collate([self.sample() for _ in range(size)])


def collate(pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    src_len = max(len(s) for s, _ in pairs)
    tgt_len = max(len(t) for _, t in pairs)
    input_ids = torch.full((len(pairs), src_len), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), src_len), dtype=torch.long)
    labels = torch.full((len(pairs), tgt_len), -100, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        labels[i, : len(t)] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def decode_bytes(ids: list[int]) -> str:
    return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET and i < 256 + BYTE_OFFSET).decode(
        "utf-8", errors="replace"
    )


@torch.no_grad()
def marker_accuracy(
    model, markers: dict[str, int], n: int, seed: int, marker_repeats: int
) -> dict[str, float]:
    """Exact match per source task when asked with its marker repeated ``marker_repeats``."""
    was_training = model.training
    model.eval()
    acc: dict[str, float] = {}
    for name, marker in markers.items():
        examples = generate_examples(name, n, seed)
        pairs = [
            ([marker] * marker_repeats + encode_bytes(e["input"]) + [EOS], [EOS]) for e in examples
        ]
        b = collate(pairs)
        embeds = model.get_input_embeddings()(b["input_ids"])
        outs = greedy_from_embeds(model, embeds, b["attention_mask"], EOS, max_new_tokens=16)
        hits = sum(decode_bytes(o) == e["target"] for o, e in zip(outs, examples, strict=True))
        acc[name] = hits / len(examples)
    model.train(was_training)
    return acc


def pretrain(cfg: PretrainConfig, *, progress: bool = True) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model(cfg)
    if cfg.init_from:
        # Continue pretraining an earlier demo backbone (same architecture options).
        from transformers import T5ForConditionalGeneration

        model = T5ForConditionalGeneration.from_pretrained(cfg.init_from)
    tasks = list(SOURCE_TASKS)
    markers = marker_token_ids(tokenizer, tasks)
    mixture = Mixture(markers, cfg, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98)
    )
    budget = cfg.minutes * 60.0 if cfg.minutes > 0 else math.inf
    model.train()
    start = time.monotonic()
    ema = None
    step = 0
    if progress:
        limit = f" or {cfg.minutes:g} minutes, whichever comes first" if cfg.minutes > 0 else ""
        print(f"pretrain-demo: training for at most {cfg.steps} steps{limit}", flush=True)
    # The bar counts the fraction of the budget spent (steps or time, whichever is further),
    # so it always ends at 100% and its ETA is never later than the time budget.
    bar = Progress(
        100,
        "pretrain-demo",
        enabled=progress,
        unit="",  # a share of the budget: off a terminal, "pretrain-demo: 40%, ..." lines
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
        leave=True,
    )
    shown = 0
    while step < cfg.steps:
        elapsed = time.monotonic() - start
        if elapsed >= budget:
            break
        # Schedule by whichever runs out first, the step count or the time budget.
        done_frac = max(step / cfg.steps, elapsed / budget)
        if int(done_frac * 100) > shown:
            bar.update(int(done_frac * 100) - shown)
            shown = int(done_frac * 100)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * max(0.05, 1.0 - done_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(**mixture.batch(cfg.batch_size)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if step % 10 == 0 or step == cfg.steps:
            bar.set_postfix(step=f"{step}/{cfg.steps}", loss=f"{ema:.4f}", lr=f"{lr:.1e}")
    bar.update(100 - shown)
    bar.close()
    if progress:
        why = "step limit" if step >= cfg.steps else "time budget"
        print(f"pretrain-demo: stopped at step {step} ({why} reached)", flush=True)
    train_seconds = time.monotonic() - start
    model.eval()
    acc = marker_accuracy(model, markers, cfg.eval_examples, cfg.seed + 7919, cfg.eval_marker)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "config": asdict(cfg),
        "params": n_params,
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "final_loss": ema,
        "markers": markers,
        "marker_accuracy": acc,
        "mean_marker_accuracy": sum(acc.values()) / max(1, len(acc)),
    }
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rankone train pretrain-demo",
        description="Pretrain a small byte-level T5 demo backbone from scratch on synthetic "
        "marker-prefixed tasks (CPU friendly).",
    )
    d = PretrainConfig(out="")
    p.add_argument("--out", required=True, help="directory for the model + tokenizer")
    p.add_argument("--steps", type=int, default=d.steps, help="max optimizer steps")
    p.add_argument(
        "--minutes",
        type=float,
        default=d.minutes,
        help="time budget; training stops when it is spent (0 = no limit)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--d-ff", type=int, default=d.d_ff)
    p.add_argument("--layers", type=int, default=d.num_layers, help="layers per side")
    p.add_argument("--heads", type=int, default=d.num_heads)
    p.add_argument(
        "--max-marker",
        type=int,
        default=d.max_marker,
        help="task markers are repeated 1..N times (N >= the demo prompt length)",
    )
    p.add_argument("--eval-examples", type=int, default=d.eval_examples)
    p.add_argument("--init-from", help="continue from an earlier pretrain-demo output")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    return PretrainConfig(
        out=args.out,
        steps=args.steps,
        minutes=args.minutes,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        d_model=args.d_model,
        d_ff=args.d_ff,
        num_layers=args.layers,
        num_heads=args.heads,
        max_marker=args.max_marker,
        eval_examples=args.eval_examples,
        threads=args.threads,
        init_from=args.init_from,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = pretrain(config_from_args(args), progress=not args.no_progress)
    acc = summary["marker_accuracy"]
    print(
        f"pretrain-demo: {summary['params']:,} params, {summary['steps']} steps in "
        f"{summary['train_seconds']:.0f}s, final loss {summary['final_loss']:.4f}"
    )
    print(
        "held-out exact match, marker-prompted source tasks: "
        + ", ".join(f"{k} {v:.0%}" for k, v in acc.items())
        + f" (mean {summary['mean_marker_accuracy']:.1%})"
    )
    print(f"saved backbone to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
