"""Exact match of served-style prompts on the demo tasks, straight from an artifact directory.

An independent check of what the server will do: load the frozen backbone and the
artifacts, compose each task's prompt ``P ⊙ (U @ V)`` with ``prompts.compose_prompt``,
prepend it to the input embeddings and decode greedily. Used by the demo build (to report the
prompts' accuracy before serving) and by the offline benchmark.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prompts import compose_prompt, load_artifact_dir, load_backbone, prepend_prompts
from trainer.demo.tasks import read_jsonl


@torch.no_grad()
def greedy_from_embeds(
    model, embeds: torch.Tensor, mask: torch.Tensor, eos: int, max_new_tokens: int
) -> list[list[int]]:
    enc = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
    batch = embeds.shape[0]
    dec = torch.full(
        (batch, 1), model.config.decoder_start_token_id, dtype=torch.long, device=embeds.device
    )
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(max_new_tokens):
        # No KV cache: the demo sequences are a handful of tokens, and a full decoder
        # forward is the plainest ground truth.
        logits = model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec).logits
        nxt = logits[:, -1].argmax(-1)
        for i in range(batch):
            if not done[i]:
                if int(nxt[i]) == eos:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        if all(done):
            break
        dec = torch.cat([dec, nxt[:, None]], dim=1)
    return out


@torch.no_grad()
def predict(
    backbone,
    prompt: torch.Tensor | None,
    inputs: list[str],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy outputs of a seq2seq backbone for ``inputs`` behind ``prompt`` [L, d] (or none)."""
    tok = backbone.tokenizer
    model = backbone.model
    outs: list[str] = []
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i : i + batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True)
        ids = enc["input_ids"].to(backbone.device)
        mask = enc["attention_mask"].to(backbone.device)
        embeds = backbone.embed(ids)
        if prompt is not None:
            prompts = prompt[None].expand(len(chunk), -1, -1).to(embeds.dtype)
            embeds, mask, _ = prepend_prompts(embeds, mask, prompts, causal=False)
        tokens = greedy_from_embeds(model, embeds, mask, tok.eos_token_id, max_new_tokens)
        outs += tok.batch_decode(tokens, skip_special_tokens=True)
    return outs


def exact_match(preds: list[str], targets: list[str]) -> float:
    if not targets:
        return 0.0
    return sum(p.strip() == t.strip() for p, t in zip(preds, targets, strict=True)) / len(targets)


def evaluate_artifacts(
    model_dir: str | Path,
    artifact_dir: str | Path | None,
    data_dir: str | Path,
    tasks: list[str],
    *,
    split: str = "test",
    limit: int | None = None,
) -> dict[str, float]:
    """Exact match per task; ``artifact_dir=None`` evaluates the bare backbone (no prompt)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    backbone = load_backbone(model_dir)
    art = (
        load_artifact_dir(Path(artifact_dir), backbone=backbone.fingerprint)
        if (artifact_dir is not None)
        else None
    )
    result: dict[str, float] = {}
    for task in tasks:
        prompt = None
        if art is not None:
            if task not in art.tasks:
                continue
            tf = art.tasks[task]
            prompt = compose_prompt(art.shared[tf.shared].prompt, tf.u, tf.v)
        rows = read_jsonl(Path(data_dir) / task / f"{split}.jsonl")[:limit]
        preds = predict(backbone, prompt, [r["input"] for r in rows])
        result[task] = exact_match(preds, [r["target"] for r in rows])
    return result
