"""Per-row next-token choice: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Each row samples from its own ``torch.Generator``, so a seeded request draws the same tokens
whatever its batch neighbours are (and however many of them there are).

Fault isolation: a row whose logits are not usable (NaN, +inf, or nothing left to choose after
its filters) never raises and never touches its neighbours: ``choose_tokens`` answers
``BAD_ROW`` for it, and the engine ends that row alone with ``NonFiniteLogitsError``.
Sampling itself never sees an invalid distribution (``torch.multinomial`` would raise on the
CPU and trip a device-side assert on CUDA, taking every row down with it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from service.engine.base import SamplingParams

BAD_ROW = -1  # the token id ``choose_tokens`` answers for a row whose logits are unusable


class NonFiniteLogitsError(RuntimeError):
    """One row's logits were not finite: its request ends alone with this error."""

    def __init__(self, task: str) -> None:
        super().__init__(
            f"the model produced non-finite scores for this request (task {task!r}): the task's "
            "factors or the sampling parameters push the backbone out of its numeric range"
        )
        self.task = task


def unusable(logits: Tensor) -> Tensor:
    """Which rows of ``logits`` [B, V] (or one row [V]) cannot be chosen from → bool [B] (or 0-d).

    NaN or +inf anywhere, or no finite entry at all (everything masked to -inf): exactly the
    rows whose maximum is not finite (``amax`` propagates NaN), so one pass over the vocabulary
    per step instead of three.
    """
    return ~torch.isfinite(logits.amax(-1))


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """The CTRL / HF penalty on one row: ``logits`` [V], ``seen`` [N] token ids.

    Positive logits of seen tokens are divided by ``penalty``, negative ones multiplied.
    """
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask (``-inf``) all but the top-k tokens and the smallest nucleus of mass >= top_p.

    logits: [V] (already temperature-scaled). The most likely token always survives.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)  # [V]
        # Drop a token once the mass *before* it already reaches top_p. The most likely token
        # is kept by construction, not by arithmetic: a top_p below float32's smallest
        # subnormal (1e-300) rounds to 0 here, and 0 >= 0 would drop every token.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_token(
    logits: Tensor, params: SamplingParams, seen: Tensor, generator: torch.Generator | None
) -> Tensor:
    """One row's next token from ``logits`` [V] (float32), as a 0-d tensor (no host sync);
    ``BAD_ROW`` when the processed logits are unusable."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return torch.where(unusable(logits), BAD_ROW, torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    bad = unusable(logits)
    # A bad row draws from a harmless stand-in so that multinomial never sees NaN / inf.
    probs = torch.softmax(torch.where(bad, torch.zeros_like(logits), logits), dim=-1)
    return torch.where(bad, BAD_ROW, torch.multinomial(probs, 1, generator=generator)[0])


def choose_token(
    logits: Tensor, params: SamplingParams, seen: Tensor, generator: torch.Generator | None
) -> int:
    """One row's next token from ``logits`` [V] (float32)."""
    return int(_next_token(logits, params, seen, generator))


def choose_tokens(
    logits: Tensor,
    params: Sequence[SamplingParams],
    seen: Sequence[Tensor],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Next tokens for a batch: ``logits`` [B, V] → B ids, ``BAD_ROW`` for unusable rows.

    Rows that are plainly greedy share one argmax; the others go one by one (their filters and
    generators are per row). The ids are read back to the host once, for the whole batch.
    """
    if logits.shape[0] == 0:
        return []
    logits = logits.float()
    out = torch.where(unusable(logits), BAD_ROW, torch.argmax(logits, dim=-1))  # [B]
    others = [b for b, p in enumerate(params) if not (p.greedy and p.repetition_penalty == 1.0)]
    if others:
        out[others] = torch.stack(
            [_next_token(logits[b], params[b], seen[b], generators[b]) for b in others]
        )  # [n]
    return out.tolist()


def make_generator(
    seed: int | None, device: torch.device, fallback: torch.Generator
) -> torch.Generator:
    """A per-row generator on ``device``: seeded by the request, else from the engine's RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=fallback))
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
