"""Prefill of newly admitted rows, as one group, apart from the running batch.

The group's forward runs on its own, over the new rows only, so its cost depends on the new
rows alone; ``RunningBatch.admit`` then writes the result into free
cache slots. Three paths:

- seq2seq: the encoder over right-padded ``[P; x]``, then the first decoder step;
- decoder-only without prefix cache: one forward over left-padded ``[pads; P; x]``;
- decoder-only with prefix cache: each task prompt's KV comes from ``PrefixCache`` (computed
  once per task version) and only the input tokens are prefilled, at positions ``L, L+1, ..``;
  where the input starts with the first ``j`` tokens of the task's latest input (a chat
  template's system turn), their columns come from the cache too and the prefill starts at
  ``L + j``. A task whose prompt is not cached is prefilled as ``[P; x]`` in the same forward
  as the other rows' inputs, and its prompt's columns are then cached: a cold task costs one
  forward, not a prompt forward and then an input forward (the weights read once, not twice).

A group's forward pads every row to its longest, so ``Prefiller.groups`` first splits what the
engine admits together into groups of like lengths where the padding would cost more than one
more forward (a cold task's ``L + T`` positions beside warm rows' ``T``, a long input beside
short ones): a forward's time is about ``a + c · positions``, and ``a / c``, what one more
forward costs in positions, is timed once per forward (``forward_positions``).

A task without prompt rows (L = 0: the base model) takes the same paths with an empty prefix.
Every forward goes through the engine's ``forward.Forward``, whichever implementation it is.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prompts.backbone import Backbone
from prompts.inputs import PromptedInputs, prepend_prompts
from service.core.tasks import ResolvedTask, compose_tasks
from service.engine.forward import EncoderSide, Forward, fastest
from service.engine.kv_layout import (
    KV,
    decode_positions,
    pad_sequences,
    prefill_positions,
)
from service.engine.prefix_cache import PrefixCache, PromptPrefix
from service.engine.rows import LoopStats, Row

log = logging.getLogger("rankone.engine")


@dataclass
class Prefill:
    """What a group's prefill hands to the running batch (b new rows)."""

    logits: Tensor  # [b, V] next-token logits
    layers: list[KV]  # per layer [b, H, T, Dh], left-padded
    mask: Tensor  # [b, T] 1 = real position
    positions: Tensor | None = None  # [b] next position id (decoder-only)
    encoder: EncoderSide | None = None  # seq2seq: encoder states, mask, cross-attention KV


class Prefiller:
    """Runs a group's prefill over the backbone (one thread: the model's)."""

    def __init__(
        self,
        backbone: Backbone,
        prefix_cache: PrefixCache | None,
        stats: LoopStats,
        forward: Forward,
    ) -> None:
        self.backbone = backbone
        self.forward = forward
        self.device = backbone.device
        self.dtype = backbone.dtype
        self.seq2seq = backbone.is_seq2seq
        # Seq2seq encoders are bidirectional: a prompt's states depend on the input.
        self.prefix_cache = None if self.seq2seq else prefix_cache
        self.stats = stats

    def groups(self, rows: Sequence[Row]) -> list[list[Row]]:
        """``rows`` as the groups to prefill, one forward each: rows of like lengths together,
        split where padding the shorter rows to the longest would cost more positions than
        one more forward does (``forward_positions``); the rows' order kept within a group."""
        if len(rows) < 2:
            return [list(rows)]
        fixed = forward_positions(self.forward, self.backbone) if not self.seq2seq else None
        if fixed is None:
            return [list(rows)]
        lengths = [self._new_positions(r) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -lengths[i])
        cuts = split_by_length([lengths[i] for i in order], fixed)
        return [[rows[i] for i in sorted(order[a:b])] for a, b in itertools.pairwise(cuts)]

    def prepare(self) -> None:
        """Time what one more forward costs (``forward_positions``) before serving, so that
        no request waits for it (``DecodeLoop.prepare``)."""
        if not self.seq2seq:
            forward_positions(self.forward, self.backbone)

    def _new_positions(self, row: Row) -> int:
        """The positions a row's prefill computes: its input's, after its prompt's where the
        prompt's prefix is cached, else the prompt's too."""
        task, n = row.request.task, len(row.request.input_ids)
        if self.prefix_cache is not None and self.prefix_cache.holds(task.name, task.version):
            return n
        return task.length + n

    def __call__(self, rows: Sequence[Row]) -> Prefill:
        if self.seq2seq:
            return self._seq2seq(rows)
        if self.prefix_cache is not None:
            return self._cached(rows)
        return self._causal(rows)

    def _compose(self, tasks: Sequence[ResolvedTask]) -> list[Tensor]:
        start = time.perf_counter()
        # on the model's device and dtype, wherever the factors came from (a no-op when
        # the device cache already holds them there)
        prompts = [p.to(device=self.device, dtype=self.dtype) for p in compose_tasks(tasks)]
        self.stats.compose_s += time.perf_counter() - start
        return prompts

    def _prompted(self, rows: Sequence[Row], *, causal: bool) -> PromptedInputs:
        """The rows' model input ``[P; x]`` laid out by ``prompts.inputs.prepend_prompts`` (the
        one rule, for training and serving): right-padded for seq2seq, left-padded with
        positions for decoder-only, [B, N, d] with N the longest row's L + T."""
        prompts = self._compose([r.request.task for r in rows])  # each [L_b, d]
        inputs = [
            self.forward.embed(
                torch.tensor([r.request.input_ids], dtype=torch.long, device=self.device)
            )[0]
            for r in rows
        ]  # each [T_b, d]
        x, x_mask = pad_sequences([t.to(self.dtype) for t in inputs], side="right")  # [B, T, d]
        p, p_mask = pad_sequences(prompts, side="right")  # [B, L, d]
        out = prepend_prompts(x, x_mask, p, causal=causal, prompt_mask=p_mask)
        used = out.attention_mask.bool().any(0).nonzero()  # columns some row needs: a block
        cols = slice(int(used[0]), int(used[-1]) + 1)
        positions = None if out.position_ids is None else out.position_ids[:, cols]
        return PromptedInputs(out.inputs_embeds[:, cols], out.attention_mask[:, cols], positions)

    def _seq2seq(self, rows: Sequence[Row]) -> Prefill:
        embeds, enc_mask, _ = self._prompted(rows, causal=False)  # [B, S, d], [B, S]
        out = self.forward.prefill_seq2seq(embeds, enc_mask)
        return Prefill(
            logits=out.logits,
            layers=out.layers,
            mask=torch.ones(len(rows), 1, dtype=torch.long, device=self.device),
            encoder=out.encoder,
        )

    def _causal(self, rows: Sequence[Row]) -> Prefill:
        """No prefix cache: one forward over left-padded ``[pads; P; x]`` (the reference layout)."""
        embeds, mask, positions = self._prompted(rows, causal=True)  # [B, N, d], [B, N] x2
        assert positions is not None
        logits, layers = self.forward.prefill(embeds, positions, mask)
        return Prefill(logits, layers, mask, decode_positions(mask))

    def _compute_prefixes(
        self, tasks: Sequence[ResolvedTask], prompts: Sequence[Tensor]
    ) -> list[PromptPrefix]:
        """The prompts' KV, one forward per prompt length, each put in the cache.

        ``prompts``: per task [L, d]. Tasks of one length share a forward over [m, L, d]: a
        burst of new tasks costs a few large GEMMs, not one small forward per task. A task
        without prompt rows (L = 0) has an empty prefix and no forward.
        """
        assert self.prefix_cache is not None
        out: list[PromptPrefix | None] = [None] * len(tasks)
        groups: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(int(prompt.shape[0]), []).append(i)
        for length, members in groups.items():
            if length == 0:
                for i in members:
                    empty = PromptPrefix((), torch.zeros(0, device=self.device))
                    self.prefix_cache.put(tasks[i].name, tasks[i].version, empty)
                    out[i] = empty
                continue
            m = len(members)
            logits, layers = self.forward.prefill(
                torch.stack([prompts[i] for i in members]),  # [m, L, d]
                torch.arange(length, device=self.device)[None].expand(m, length),
                torch.ones(m, length, dtype=torch.long, device=self.device),
            )  # logits [m, V]
            for j, i in enumerate(members):
                # views: the cache copies what it admits (not the whole group's tensors)
                prefix = PromptPrefix(
                    tuple((k[j : j + 1], v[j : j + 1]) for k, v in layers), logits[j]
                )
                self.prefix_cache.put(tasks[i].name, tasks[i].version, prefix)
                out[i] = prefix
        return [p for p in out if p is not None]

    def _prefixes(
        self, tasks: Sequence[ResolvedTask], inputs: Sequence[Sequence[int]]
    ) -> list[PromptPrefix | None]:
        """Each row's prompt prefix (one cache lookup per distinct (task, version)); None for a
        row whose prompt is not cached and is prefilled with its input (prompt rows and a
        non-empty input in every row of that task). The prefix of a task with an empty-input
        row is computed first (its logits after the prompt are that row's first logits)."""
        assert self.prefix_cache is not None
        # We keep our own refs, so a prefix evicted (tiny budget) by a later put is still used
        # here rather than recomputed.
        empty_input = {(t.name, t.version) for t, x in zip(tasks, inputs, strict=True) if not x}
        found: dict[tuple[str, int], PromptPrefix | None] = {}
        missing: dict[tuple[str, int], ResolvedTask] = {}
        for task in tasks:
            key = (task.name, task.version)
            if key in found or key in missing:
                continue
            cached = self.prefix_cache.get(task.name, task.version)
            needs_logits = key in empty_input
            if cached is not None and (cached.last_logits is not None or not needs_logits):
                found[key] = cached
            elif task.length > 0 and not needs_logits:
                found[key] = None  # prefilled with the input, cached after
            else:
                missing[key] = task
        if missing:
            new = list(missing.values())
            computed = self._compute_prefixes(new, self._compose(new))
            found.update(zip(missing, computed, strict=True))
        return [found[(t.name, t.version)] for t in tasks]

    def _cached(self, rows: Sequence[Row]) -> Prefill:
        """Reuse each task's prompt KV, and the first tokens of its latest input where the new
        input starts with them; prefill only the rest of the input, after them."""
        assert self.prefix_cache is not None
        tasks = [r.request.task for r in rows]
        inputs = [list(r.request.input_ids) for r in rows]
        prompts = self._prefixes(tasks, inputs)
        # per row: its past as segments, each per layer [1, H, P_s, Dh] (views: the prompt's
        # columns, then the reused input's); _stack_pasts copies each column once
        pasts: list[list[tuple[KV, ...]]] = []
        skip: list[int] = []  # per row: input tokens already in its past
        for task, prompt, x in zip(tasks, prompts, inputs, strict=True):
            if prompt is None:  # the prompt is prefilled with the input
                pasts.append([])
                skip.append(0)
                continue
            latest = self.prefix_cache.get_input(task.name, task.version)
            j = 0
            if latest is not None and latest.length == len(latest.tokens):
                j = common_prefix(latest.tokens, x, limit=len(x) - 1)  # >= 1 token to prefill
            segments = [prompt.layers] if prompt.layers else []
            if latest is not None and j > 0:  # the input's first j columns after the prompt's
                segments.append(tuple((k[:, :, :j], v[:, :, :j]) for k, v in latest.layers))
            pasts.append(segments)
            skip.append(j)
        past_lengths = [sum(int(seg[0][0].shape[2]) for seg in p) for p in pasts]
        longest = max(past_lengths)
        layers = _stack_pasts(pasts, longest)  # per layer [B, H, Pmax, Dh]; None: no past at all
        prefix_mask, _ = pad_sequences(
            [torch.ones(n, dtype=torch.long, device=self.device) for n in past_lengths],
            side="left",
            length=longest,
        )  # [B, Pmax]
        lengths = torch.tensor(past_lengths, device=self.device)  # [B]
        ids = [
            torch.tensor(x[j:], dtype=torch.long, device=self.device)
            for x, j in zip(inputs, skip, strict=True)
        ]
        empty = [len(x) == 0 for x in inputs]  # such a row's next token follows its prompt
        if all(empty):
            assert layers is not None  # an empty input is refused without prompt rows
            last = [p.last_logits for p in prompts if p is not None]
            assert len(last) == len(rows) and all(t is not None for t in last)
            last_logits = torch.stack(last)  # type: ignore[arg-type]  # [B, V]
            return Prefill(last_logits, layers, prefix_mask, decode_positions(prefix_mask))
        cold = [b for b, p in enumerate(prompts) if p is None]
        if cold:  # [P; x] for those rows, x alone for the others
            composed = dict(zip(cold, self._compose([tasks[b] for b in cold]), strict=True))
            # one embedding call for every row's tokens, split back per row
            flat = self.forward.embed(torch.cat(ids)[None])[0]  # [Σ T_b, d]
            pieces = list(flat.split([len(t) for t in ids]))
            for b, composed_rows in composed.items():
                pieces[b] = torch.cat([composed_rows.to(flat.dtype), pieces[b]])
            embeds, input_mask = pad_sequences(pieces, side="left")  # [B, T, d], [B, T]
        else:
            input_ids, input_mask = pad_sequences(ids, side="left")  # [B, T]
            embeds = self.forward.embed(input_ids)
        mask = torch.cat([prefix_mask, input_mask], dim=1)  # [B, Pmax + T]
        logits, layers = self.forward.prefill(
            embeds, prefill_positions(lengths, input_mask), mask, layers
        )
        if cold:
            self._keep_prompts([tasks[b] for b in cold], cold, layers, mask)
        if any(empty):
            logits = torch.stack(
                [
                    p.last_logits.to(logits.dtype)
                    if e and p and p.last_logits is not None
                    else logits[b]
                    for b, (p, e) in enumerate(zip(prompts, empty, strict=True))
                ]
            )
        self.stats.input_tokens_reused += sum(skip)
        self._keep_inputs(tasks, inputs, layers, mask)
        return Prefill(logits, layers, mask, decode_positions(mask))

    def _keep_prompts(
        self, tasks: Sequence[ResolvedTask], rows: Sequence[int], layers: list[KV], mask: Tensor
    ) -> None:
        """The prompts prefilled with their rows' inputs, cached: each row's first L real
        columns (a prompt's keys and values do not depend on what follows it), as views: the
        cache copies those it admits."""
        assert self.prefix_cache is not None
        for task, b in zip(tasks, rows, strict=True):
            first = int(mask[b].nonzero()[0])  # the row's first real column: its prompt's
            cols = slice(first, first + task.length)
            kept = tuple((k[b : b + 1, :, cols], v[b : b + 1, :, cols]) for k, v in layers)
            self.prefix_cache.put(task.name, task.version, PromptPrefix(kept, None))

    def _keep_inputs(
        self,
        tasks: Sequence[ResolvedTask],
        inputs: Sequence[list[int]],
        layers: list[KV],
        mask: Tensor,
    ) -> None:
        """Each task's latest input's columns (after its prompt's, which the task's prompt
        entry holds), for the next request that starts alike."""
        assert self.prefix_cache is not None
        for b, (task, x) in enumerate(zip(tasks, inputs, strict=True)):
            if not x:
                continue
            # the row's columns are its prompt's, then its input's: keep the input's
            real = mask[b].nonzero().squeeze(1)[-len(x) :]
            kept = tuple(
                (k[b : b + 1].index_select(2, real), v[b : b + 1].index_select(2, real))
                for k, v in layers
            )
            prefix = PromptPrefix(kept, layers[0][0].new_zeros(0), tokens=tuple(x))
            self.prefix_cache.put_input(task.name, task.version, prefix)


def split_by_length(lengths: Sequence[int], fixed: float) -> list[int]:
    """Where to cut ``lengths`` (sorted, longest first) into groups, as boundaries
    ``[0, .., len]``: the cuts that minimise the groups' padded positions (each group pads
    to its first) plus ``fixed`` per group (one forward's cost, in positions)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: the first j rows' cost
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # rows i..j-1 as one group
            cost = best[i] + fixed + (j - i) * lengths[i]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds = [n]
    while bounds[-1] > 0:
        bounds.append(cut[bounds[-1]])
    return bounds[::-1]


# what one more forward costs, in prefill positions, per forward (timed once)
_FORWARD_POSITIONS: weakref.WeakKeyDictionary[Forward, float | None] = weakref.WeakKeyDictionary()


def forward_positions(forward: Forward, backbone: Backbone) -> float | None:
    """What one more prefill forward costs, in positions: a forward's time is about
    ``a + c · positions`` (the weights' read and the per-operator cost, then the products'
    work), timed once per forward at 8 and 64 positions (best of 3, ~0.1-0.5 s on a CPU);
    ``a / c``, or None where a forward's time did not grow with its positions (a GPU at
    these sizes: then a group is never split)."""
    if forward in _FORWARD_POSITIONS:
        return _FORWARD_POSITIONS[forward]

    def prefill(n: int) -> None:
        embeds = torch.zeros(1, n, backbone.dim, dtype=backbone.dtype, device=backbone.device)
        positions = torch.arange(n, device=backbone.device)[None]
        forward.prefill(embeds, positions, torch.ones_like(positions))
        _sync(backbone.device)

    fixed = None  # a model that cannot run this probe: groups are never split
    try:
        with torch.inference_mode():
            fixed = fixed_positions({n: fastest(functools.partial(prefill, n), 3) for n in (8, 64)})
    except Exception:
        log.warning("could not time a prefill forward; admitted groups stay whole", exc_info=True)
    _FORWARD_POSITIONS[forward] = fixed
    return fixed


def fixed_positions(times: dict[int, float]) -> float | None:
    """From a forward's times at two position counts, ``{n: seconds}``: the positions its fixed
    cost is worth (``a / c`` in ``a + c · n``), or None where it did not grow with ``n``."""
    (n1, t1), (n2, t2) = sorted(times.items())
    per_position = (t2 - t1) / (n2 - n1)
    return None if per_position <= 0 else max(0.0, t1 / per_position - n1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stack_pasts(pasts: Sequence[Sequence[tuple[KV, ...]]], longest: int) -> list[KV] | None:
    """Per-row pasts, each as segments (per layer [1, H, P_s, Dh]: a prompt's columns, then
    the reused input's; none for a row without a past), as one left-padded past per layer
    [B, H, longest, Dh]: each column copied once, the padding zeroed. None when no row has a
    past."""
    template = next((seg for row in pasts for seg in row), None)
    if template is None:
        return None
    stacked: list[KV] = []
    for i, layer in enumerate(template):
        pair = []
        for which, t in enumerate(layer):  # keys, then values
            out = t.new_empty(len(pasts), t.shape[1], longest, t.shape[3])
            for b, row in enumerate(pasts):
                end = longest
                for seg in reversed(row):
                    piece = seg[i][which][0]  # [H, P_s, Dh]
                    out[b, :, end - piece.shape[1] : end].copy_(piece)
                    end -= piece.shape[1]
                if end:
                    out[b, :, :end].zero_()
            pair.append(out)
        stacked.append((pair[0], pair[1]))
    return stacked


def common_prefix(a: Sequence[int], b: Sequence[int], *, limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit`` (0 if negative)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= limit or x != y:
            break
        n += 1
    return n
