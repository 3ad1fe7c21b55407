"""Every row of a mixed-task continuous batch decodes exactly like ``generate`` for it alone."""

from __future__ import annotations

import dataclasses

import pytest

from prompts import Backbone
from service.engine import prefill as prefill_module
from service.engine.decode import DecodeLoop
from service.engine.prefix_cache import PrefixCache
from tests.engine.conftest import (
    DEVICE,
    TEXTS,
    make_tasks,
    reference_generate,
    reference_no_cache,
    request,
    row,
)

# (joins before step k, task index, text index, max_new_tokens): rows join mid-flight and leave
# early, with different lengths, tasks and shared prompts in the same batch.
SCHEDULE = [(0, 0, 0, 12), (0, 1, 1, 4), (2, 2, 2, 9), (3, 3, 3, 14), (3, 0, 1, 6), (6, 1, 3, 10)]


def run_schedule(backbone: Backbone, loop: DecodeLoop) -> list:
    tasks = make_tasks(backbone)
    sinks, reqs = [], []
    step = 0
    pending = list(SCHEDULE)
    while pending or loop.running:
        joining = [p for p in pending if p[0] <= step]
        pending = [p for p in pending if p[0] > step]
        rows = []
        for _, t, x, n in joining:
            req = request(backbone, tasks[t], TEXTS[x], f"r{len(reqs)}", max_new_tokens=n)
            r, sink = row(req)
            rows.append(r)
            sinks.append(sink)
            reqs.append(req)
        loop.admit(rows)
        loop.step()
        step += 1
    return list(zip(reqs, sinks, strict=True))


@pytest.mark.parametrize(
    ("kind", "prefix"),
    [("t5", False), ("gpt2", False), ("gpt2", True), ("llama", False), ("llama", True)],
)
def test_mixed_batch_matches_generate_alone(
    backbones: dict[str, Backbone], kind: str, prefix: bool
) -> None:
    backbone = backbones[kind]
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24) if prefix else None)
    done = run_schedule(backbone, loop)
    assert loop.running == 0
    for req, sink in done:
        expected = reference_generate(backbone, req.task, req.input_ids, req.params.max_new_tokens)
        assert sink.result is not None
        assert sink.result.token_ids == expected, req.request_id
        reason = "length" if len(expected) == req.params.max_new_tokens else "stop"
        assert sink.result.finish_reason == reason


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_matches_no_cache_ground_truth(backbones: dict[str, Backbone], kind: str) -> None:
    backbone = backbones[kind]
    tasks = make_tasks(backbone)
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24))
    rows = [row(request(backbone, tasks[i], TEXTS[i], f"r{i}", max_new_tokens=8)) for i in range(3)]
    loop.admit([r for r, _ in rows])
    while loop.running:
        loop.step()
    for r, sink in rows:
        req = r.request
        assert sink.result.token_ids == reference_no_cache(backbone, req.task, req.input_ids, 8)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_prefix_equals_no_cache_path(backbones: dict[str, Backbone], kind: str) -> None:
    backbone = backbones[kind]
    cache = PrefixCache(1 << 24)
    results = {}
    for mode, prefix_cache in (("cached", cache), ("plain", None)):
        loop = DecodeLoop(backbone, prefix_cache=prefix_cache)
        results[mode] = [s.result.token_ids for _, s in run_schedule(backbone, loop)]
    assert results["cached"] == results["plain"]
    tasks = make_tasks(backbone)
    assert all(cache.get(t.name, t.version) is not None for t in tasks)  # one prompt prefix each
    assert len(cache) == 8  # and each task's latest input
    assert cache.hits > 0


SYSTEM = "system: answer in one word. user: "


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_inputs_that_start_alike_reuse_the_cached_columns(
    backbones: dict[str, Backbone], kind: str
) -> None:
    """A task's next input starting with its latest input's first tokens (a chat template's
    system turn) prefills only the rest, and decodes as with no cache at all; in one group too,
    where rows reuse different lengths (an identical input keeps one token to prefill)."""
    backbone = backbones[kind]
    tasks = make_tasks(backbone)
    texts = [SYSTEM + "what is red", SYSTEM + "the quick fox", SYSTEM + "what is red"]
    cache = PrefixCache(1 << 24)
    loop = DecodeLoop(backbone, prefix_cache=cache)
    plain = DecodeLoop(backbone, prefix_cache=None)
    first = row(request(backbone, tasks[0], texts[0], "a", max_new_tokens=6))
    loop.admit([first[0]])
    assert loop.stats.input_tokens_reused == 0
    latest = cache.get_input(tasks[0].name, tasks[0].version)
    assert latest is not None and list(latest.tokens) == first[0].request.input_ids
    # the input entry holds the input's columns only: the prompt's are the prompt entry's
    prompt = cache.get(tasks[0].name, tasks[0].version)
    assert prompt is not None and prompt.length == tasks[0].length
    assert latest.length == len(latest.tokens)
    group = [
        row(request(backbone, tasks[0], text, f"g{i}", max_new_tokens=6))
        for i, text in enumerate(texts[1:])
    ] + [row(request(backbone, tasks[1], texts[1], "other", max_new_tokens=6))]
    loop.admit([r for r, _ in group])
    shared = len(backbone.tokenizer(SYSTEM)["input_ids"]) - 1  # the last may merge onward
    same = len(first[0].request.input_ids) - 1  # the identical input: all but its last token
    assert loop.stats.input_tokens_reused >= shared + same
    while loop.running:
        loop.step()
    for r, sink in [first, *group]:
        ref, ref_sink = row(request(backbone, r.request.task, "", "ref", max_new_tokens=6))
        ref.request.input_ids = list(r.request.input_ids)
        plain.admit([ref])
        while plain.running:
            plain.step()
        assert sink.result.token_ids == ref_sink.result.token_ids, r.request.request_id


def test_a_new_version_does_not_reuse_the_old_inputs(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["llama"]
    task = make_tasks(backbone)[0]
    cache = PrefixCache(1 << 24)
    loop = DecodeLoop(backbone, prefix_cache=cache)
    loop.admit([row(request(backbone, task, SYSTEM + "a", max_new_tokens=1))[0]])
    newer = dataclasses.replace(task, version=task.version + 1, u=task.u * 2)
    loop.admit([row(request(backbone, newer, SYSTEM + "b", max_new_tokens=1))[0]])
    assert loop.stats.input_tokens_reused == 0
    assert cache.get_input(task.name, task.version) is None  # dropped with its version


def test_prefix_invalidation_recomputes(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["gpt2"]
    cache = PrefixCache(1 << 24)
    loop = DecodeLoop(backbone, prefix_cache=cache)
    tasks = make_tasks(backbone)
    loop.admit([row(request(backbone, tasks[0], TEXTS[0], max_new_tokens=2))[0]])
    assert len(cache) == 2  # the prompt's prefix and the latest input
    assert cache.invalidate("task-0") == 2
    assert len(cache) == 0
    while loop.running:
        loop.step()


def test_empty_input_uses_prefix_logits(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["llama"]
    task = make_tasks(backbone)[0]
    outs = []
    for prefix_cache in (PrefixCache(1 << 24), None):
        loop = DecodeLoop(backbone, prefix_cache=prefix_cache)
        r, sink = row(request(backbone, task, "", max_new_tokens=5))
        r.request.input_ids = []
        other, _ = row(request(backbone, task, TEXTS[3], max_new_tokens=5))
        loop.admit([r, other])
        while loop.running:
            loop.step()
        outs.append(sink.result.token_ids)
    assert outs[0] == outs[1]


def test_t5_with_more_decoder_than_encoder_layers(tmp_path) -> None:
    """``generate`` fails on such configs in transformers 5.24 (DESIGN §9); the engine must not."""
    from prompts import load_backbone
    from tests.tiny_models import build_tiny_t5

    build_tiny_t5(tmp_path, d_model=32, num_layers=1, num_decoder_layers=3)
    backbone = load_backbone(tmp_path, device=DEVICE)
    tasks = make_tasks(backbone)
    loop = DecodeLoop(backbone)
    rows = [
        row(request(backbone, tasks[i], TEXTS[i], f"r{i}", max_new_tokens=6 + i)) for i in range(2)
    ]
    loop.admit([rows[0][0]])
    loop.step()
    loop.admit([rows[1][0]])
    while loop.running:
        loop.step()
    for r, sink in rows:
        req = r.request
        expected = reference_no_cache(backbone, req.task, req.input_ids, req.params.max_new_tokens)
        assert sink.result.token_ids == expected


def test_absolute_position_limit_ends_with_length_or_refuses(
    backbones: dict[str, Backbone],
) -> None:
    backbone = backbones["gpt2"]
    task = make_tasks(backbone)[0]
    loop = DecodeLoop(backbone)
    loop.max_positions = 20  # as if the position table had 20 rows
    fits, sink = row(request(backbone, task, "a b c", max_new_tokens=50))
    too_long, _ = row(request(backbone, task, TEXTS[3] * 2, max_new_tokens=5))
    errors: list[BaseException] = []
    too_long.fail = errors.append
    loop.admit([fits, too_long])
    while loop.running:
        loop.step()
    used = 5 + len(fits.request.input_ids)
    assert sink.result.finish_reason in ("length", "stop")
    # The last new token is never fed back: L + T + n - 1 positions serve n tokens.
    assert len(sink.result.token_ids) <= 20 - used + 1
    assert len(errors) == 1 and "positions" in str(errors[0])


def test_every_position_of_the_table_is_used(backbones: dict[str, Backbone]) -> None:
    """The real GPT-2 table (n_positions rows): a row runs up to its last position, no further
    (one more would raise IndexError in the position embedding)."""
    backbone = backbones["gpt2"]
    task = make_tasks(backbone)[0]
    loop = DecodeLoop(backbone)
    table = backbone.model.config.n_positions
    assert loop.max_positions == table
    loop.eos_ids = set()  # run to the limit, whatever the random model says
    r, sink = row(request(backbone, task, TEXTS[3], max_new_tokens=10 * table))
    loop.admit([r])
    while loop.running:
        loop.step()
    used = task.prompt.shape[0] + len(r.request.input_ids)
    assert sink.result is not None
    assert sink.result.finish_reason == "length"
    assert len(sink.result.token_ids) == table - used + 1


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_half_precision_runs_in_the_model_dtype(tiny_model_dirs, kind: str) -> None:
    """bfloat16 (the CPU stand-in for GPU half precision): prompts, caches follow the model."""
    import torch

    from prompts import load_backbone

    backbone = load_backbone(tiny_model_dirs[kind], dtype="bfloat16", device=DEVICE)
    tasks = make_tasks(backbone)  # float32 factors, as a store might hand them over
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24))
    rows = [
        row(request(backbone, tasks[i], TEXTS[i], f"r{i}", max_new_tokens=4 + i)) for i in range(3)
    ]
    loop.admit([r for r, _ in rows[:2]])
    loop.step()
    loop.admit([rows[2][0]])
    while loop.running:
        loop.step()
    for _, sink in rows:
        assert sink.result is not None and sink.result.finish_reason in ("length", "stop")
    if loop.prefix_cache is not None:  # decoder-only: the cached prompt KV is bfloat16 too
        prefix = loop.prefix_cache.get(tasks[0].name, tasks[0].version)
        assert prefix is not None and prefix.layers[0][0].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_long_generation_moves_the_cache_window_and_stays_exact(
    backbones: dict[str, Backbone], kind: str
) -> None:
    """Past the first buffers' capacity the slot cache moves (reallocates) mid-decode."""
    backbone = backbones[kind]
    tasks = make_tasks(backbone)
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24))
    loop.eos_ids = set()  # every row runs to its token limit
    rows = [
        row(request(backbone, tasks[i], TEXTS[i], f"r{i}", max_new_tokens=n))
        for i, n in ((0, 300), (2, 40))
    ]
    loop.admit([rows[0][0]])
    for _ in range(20):
        loop.step()
    loop.admit([rows[1][0]])
    while loop.running:
        loop.step()
    assert loop.batch.kv.moves >= 2  # the first allocation and at least one move
    for r, sink in rows:
        req = r.request
        expected = reference_no_cache(backbone, req.task, req.input_ids, r.limit, stop_at_eos=False)
        assert sink.result.token_ids == expected, req.request_id


def test_a_non_streaming_row_emits_only_its_result(backbones: dict[str, Backbone]) -> None:
    """``streaming=False`` (a non-streaming request): one delta, the last, with the same result
    as the streaming row beside it, whose deltas add up to that text."""
    backbone = backbones["llama"]
    task = make_tasks(backbone)[0]
    loop = DecodeLoop(backbone)
    loop.eos_ids = set()  # both run to their limit
    quiet, quiet_sink = row(request(backbone, task, TEXTS[0], "q", max_new_tokens=6))
    quiet.streaming = False
    loud, loud_sink = row(request(backbone, task, TEXTS[0], "l", max_new_tokens=6))
    loop.admit([quiet, loud])
    while loop.running:
        loop.step()
    assert len(quiet_sink.deltas) == 1
    assert len(loud_sink.deltas) == 6
    assert quiet_sink.result is not None and loud_sink.result is not None
    assert quiet_sink.result.token_ids == loud_sink.result.token_ids
    assert quiet_sink.result.text == "".join(d.text for d in loud_sink.deltas)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_cold_task_is_one_forward_and_its_cached_prompt_serves_later_rows_exactly(
    backbones: dict[str, Backbone], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task whose prompt is not cached is prefilled as [P; x] in the group's one forward (no
    prompt-only forward before it), beside a warm task's input; its prompt columns are then
    cached and serve its next request, and a request with an empty input (which needs the
    logits after the prompt, not kept by that forward) recomputes them; every answer equals the
    no-cache path."""
    backbone = backbones[kind]
    tasks = make_tasks(backbone)
    cache = PrefixCache(1 << 24)
    loop = DecodeLoop(backbone, prefix_cache=cache)
    plain = DecodeLoop(backbone, prefix_cache=None)
    calls: list[int] = []
    counting = False
    prefill = loop.prefill.forward.prefill

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        if counting:  # the cached loop's (the fused forward is shared with the plain loop)
            calls.append(int(args[0].shape[0]))
        return prefill(*args, **kwargs)

    # undone after the test (the fused forward is built once per model and shared): as an
    # entry of the instance's dict, removed again, not left behind as a bound method
    monkeypatch.setitem(vars(loop.prefill.forward), "prefill", counted)
    # as where a forward's time does not grow with its positions: the group is never split
    monkeypatch.setitem(prefill_module._FORWARD_POSITIONS, loop.prefill.forward, None)

    def run(dl: DecodeLoop, task_texts: list[tuple[int, str]]) -> list[list[int]]:
        nonlocal counting
        counting = dl is loop
        pairs = [
            row(request(backbone, tasks[t], text, f"r{i}", max_new_tokens=6))
            for i, (t, text) in enumerate(task_texts)
        ]
        for (r, _), (_, text) in zip(pairs, task_texts, strict=True):
            if not text:
                r.request.input_ids = []
        dl.admit([r for r, _ in pairs])
        while dl.running:
            dl.step()
        return [s.result.token_ids for _, s in pairs]

    assert run(loop, [(0, TEXTS[0])]) == run(plain, [(0, TEXTS[0])])  # cold: one forward
    assert calls == [1]
    cached = cache.get(tasks[0].name, tasks[0].version)
    assert cached is not None and cached.last_logits is None
    assert cached.length == tasks[0].length
    calls.clear()
    group = [(0, TEXTS[1]), (1, TEXTS[2]), (1, TEXTS[3])]  # warm task 0 beside cold task 1
    assert run(loop, group) == run(plain, group)
    assert calls == [3]
    calls.clear()
    assert run(loop, [(0, "")]) == run(plain, [(0, "")])  # the logits after the prompt
    assert calls == [1]  # the prompt alone, once
    refreshed = cache.get(tasks[0].name, tasks[0].version)
    assert refreshed is not None and refreshed.last_logits is not None
