"""RANKONE_COMPILED_STEP: decode steps compiled by inductor (``CompiledStep``).

Compiled with the tiny Llama (a C++ compiler is on every machine the tests run on). What holds:
float32 rows decoded alone and in mixed batches (every step compiled: one graph for one row,
one for any number of rows above) equal HF ``generate``; one graph serves every window, cache
size and move; low-precision rows decode alone what they decode in an eager batch, and a
compiled step of several rows gives the eager step's logits to rounding; the extern product is
its weight's eager product; a compile that fails or a graph that does not fit leaves steps
eager, never wrong.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch._dynamo.output_graph as dynamo_output

from prompts import Backbone
from service.engine import one_row
from service.engine.compiled_step import CompiledStep, _stable_graph_names
from service.engine.decode import DecodeLoop
from service.engine.forwards import choose_forward
from service.engine.fused_llama import FusedLlama, Int4Weight
from service.engine.prefix_cache import PrefixCache
from service.settings import Settings
from tests.engine.conftest import (
    TEXTS,
    make_tasks,
    reference_generate,
    reference_no_cache,
    request,
    row,
)
from tests.engine.test_decode_reference import run_schedule


def compiled(backbone: Backbone, weights: str = "float32") -> CompiledStep:
    forward = choose_forward(backbone, weights=weights, compiled=True)
    assert isinstance(forward, CompiledStep)
    forward.prepare()
    assert forward.off is None, forward.off
    return forward


def decode_alone(backbone: Backbone, forward: Any, req: Any) -> list[int]:
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
    r, sink = row(req)
    loop.admit([r])
    while loop.running:
        loop.step()
    assert sink.result is not None
    return sink.result.token_ids


def decode_counting(backbone: Backbone, forward: Any, req: Any, op: str) -> tuple[list[int], int]:
    """``req`` decoded alone by ``forward``, and how many times the operator ``op`` ran in it
    (``torch.profiler``'s count)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tokens = decode_alone(backbone, forward, req)
    return tokens, sum(e.count for e in prof.key_averages() if e.key == op)


def test_one_row_steps_compiled_equal_generate(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["llama"]
    forward = compiled(backbone)
    assert forward.kind == "fused+compiled" and isinstance(forward.inner, FusedLlama)
    assert choose_forward(backbone, compiled=True) is forward  # one per forward
    tasks = make_tasks(backbone)
    for i in range(3):
        req = request(backbone, tasks[i], TEXTS[i], f"a{i}", max_new_tokens=12)
        expected = reference_generate(backbone, req.task, req.input_ids, 12)
        before = forward.steps
        assert decode_alone(backbone, forward, req) == expected
        assert forward.steps - before == len(expected) - 1  # every step compiled
    # mixed batches, rows joining and leaving: steps of one row and of 2, 3, ... rows compiled
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
    several = forward.several
    for req, sink in run_schedule(backbone, loop):
        expected = reference_generate(backbone, req.task, req.input_ids, req.params.max_new_tokens)
        assert sink.result is not None and sink.result.token_ids == expected, req.request_id
    assert forward.misses == 0 and forward.several - several > 0


def test_one_row_products_run_rankones_kernels_else_inductors_reductions(
    backbones: dict[str, Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernels build (a CPU with AVX-512), every float32 product of the compiled
    one-row step runs them (``Products.kernel``: 4 a layer and the lm_head's); where the forward
    does not run them (here: turned off), inductor's reductions over the plain matrices: either
    decodes what HF ``generate`` does."""
    backbone = backbones["llama"]
    built = one_row.load()
    forward = compiled(backbone)
    assert forward.one_row == built and forward.inner.kernels == (built is None)
    tasks = make_tasks(backbone)
    req = request(backbone, tasks[2], TEXTS[2], "plain", max_new_tokens=12)
    expected = reference_generate(backbone, req.task, req.input_ids, 12)
    runs = [("kernels", forward)]
    monkeypatch.setattr(forward.inner, "kernels", False)
    plain = CompiledStep(forward.inner)
    plain.prepare()
    assert plain.off is None and plain.one_row is not None
    runs.append(("reductions", plain))
    for name, step in runs:
        before = step.steps
        tokens, calls = decode_counting(backbone, step, req, "rankone_cpu::one_row")
        assert tokens == expected, name
        steps = step.steps - before
        assert steps == len(expected) - 1 and step.misses == 0, name
        products = 4 * len(forward.layers) + 1
        assert calls == (products * steps if name == "kernels" and built is None else 0), name


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_products_of_a_few_rows_run_the_kernels_each_row_as_alone(
    backbones: dict[str, Backbone], weights: str
) -> None:
    """Where the kernels build, a several-row step's float32 and bfloat16 products of up to
    ``one_row.MAX_ROWS`` rows run them (the weights read once for all the rows): each row the
    bits of its product alone; more rows run the eager forward's GEMMs."""
    from service.engine.fused_llama import _product, _product_t

    forward = compiled(backbones["llama"], weights)
    if forward.one_row is not None:
        pytest.skip(forward.one_row)
    g = torch.Generator().manual_seed(0)
    for name in ("qkv", "o", "gate_up", "down"):
        extern = getattr(forward.extern_layers[0], name)
        fn = _product_t if extern.weight_major else _product
        plain = extern.weight if weights == "float32" else extern.weight.w
        d = plain.shape[1]
        for n in (2, 5, one_row.MAX_ROWS, one_row.MAX_ROWS + 1):
            x = torch.randn(n, d, generator=g).to(extern.dtype or torch.float32)
            with torch.inference_mode():
                got = torch.ops.rankone.product(x, extern.key)
                got = got.t() if extern.weight_major else got
                alone = [torch.ops.rankone.product(x[j : j + 1], extern.key) for j in range(n)]
                alone = [a.t() if extern.weight_major else a for a in alone]
                kernel = n <= one_row.MAX_ROWS
                assert extern.how(n).kernel == kernel
                if kernel:  # rankone's kernel, each row's bits as alone
                    want = one_row.product(x.float(), plain).to(x.dtype)
                    assert torch.equal(torch.cat(alone), got), (name, n)
                else:  # the eager GEMM (oneDNN's prepacked bfloat16, torch's float32)
                    want = fn(extern.weight, None, x, extern.how(n))
                    want = want.t() if extern.weight_major else want
            assert torch.equal(got, want), (name, n)


def test_one_graph_serves_every_window_and_cache_move(backbones: dict[str, Backbone]) -> None:
    """A long one-row decode moves the window and reallocates the slot cache (other rows' and
    columns' capacities, windows starting at column 0): every step compiled, none recompiled,
    the tokens the no-cache ground truth's."""
    backbone = backbones["llama"]
    forward = compiled(backbone)
    tasks = make_tasks(backbone)
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
    loop.eos_ids = set()
    r, sink = row(request(backbone, tasks[1], TEXTS[1], "long", max_new_tokens=300))
    loop.admit([r])
    steps, misses = forward.steps, forward.misses
    while loop.running:
        loop.step()
    assert loop.batch.kv.moves >= 2
    assert forward.misses == misses and forward.steps - steps == 299
    expected = reference_no_cache(
        backbone, r.request.task, r.request.input_ids, 300, stop_at_eos=False
    )
    assert sink.result is not None and sink.result.token_ids == expected


@pytest.mark.parametrize("weights", ["int8", "int4", "bfloat16"])
def test_low_precision_rows_decode_alone_what_they_decode_in_a_batch(
    backbones: dict[str, Backbone], weights: str
) -> None:
    """Alone every step is compiled (int8: a reduction; bfloat16, int4: rankone's one-row
    kernels where they build), in an eager batch not: the same numbers up to the order of each
    sum (both round activations and outputs to bfloat16); a compiled step of several rows (the
    copies' own kernels) gives the eager step's logits to rounding."""
    backbone = backbones["llama"]
    forward = compiled(backbone, weights)
    assert forward.kind == forward.inner.kind + "+compiled"
    if weights == "bfloat16":  # the compiled step reads plain copies of prepacked matrices
        assert all(layer.down.w is not None for layer in forward.layers)
    q4 = weights == "int4" and forward.one_row is None and one_row.has_q4()
    if q4:  # the tiny model's matrices: whole tiles of 64 rows, in the 4-bit kernel's layout
        matrices = [m for layer in forward.layers for m in (layer.qkv, layer.o, layer.down)]
        assert all(isinstance(m, Int4Weight) and m.tiles is not None for m in matrices)
    mixed = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward.inner)
    for i, (req, sink) in enumerate(run_schedule(backbone, mixed)):
        assert sink.result is not None
        steps = forward.steps
        tokens, calls = decode_counting(backbone, forward, req, "rankone_cpu::one_row_q4")
        assert tokens == sink.result.token_ids, req.request_id
        # the compiled one-row steps: every 4-bit product by the kernel (counted after the
        # graph's first run in this process, which ran one step's products more)
        if q4 and i == 1:
            assert calls == 4 * len(forward.layers) * (forward.steps - steps) > 0
    assert forward.steps > 0 and forward.misses == 0
    # one step's logits against the eager step's, of one row and of three: rounding apart
    tasks = make_tasks(backbone)
    for n in (1, 3):
        loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
        loop.admit([row(request(backbone, tasks[i], TEXTS[i], f"r{i}"))[0] for i in range(n)])
        several = forward.several
        with torch.inference_mode():
            loop.batch.kv.open_column()
            inputs = loop.batch.step_inputs()
            eager, fast = forward.inner.step(inputs), forward.step(inputs)
        assert forward.several - several == (n > 1)
        scale = float(eager.abs().max())
        torch.testing.assert_close(fast, eager, rtol=0, atol=0.02 * scale)


@pytest.mark.parametrize("weights", ["float32", "float32-packed", "int8", "int4", "bfloat16"])
def test_an_extern_product_is_its_weights_eager_product(
    backbones: dict[str, Backbone], weights: str
) -> None:
    """``rankone::product`` runs the eager forward's own product for the call's row count,
    bit for bit, and its fake (what the graph is traced with) agrees with it (opcheck)."""
    from service.engine.compiled_step import ExternWeight
    from service.engine.fused_llama import _product

    inner = choose_forward(backbones["llama"], weights=weights)
    assert isinstance(inner, FusedLlama)
    layer = inner.step_layers[0]
    d = int(inner.norm.shape[0])
    extern = ExternWeight.of(layer.gate_up, d, inner.products, inner.head)
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 17):
        x = torch.randn(n, d, generator=g)
        with torch.inference_mode():
            got = extern.product(x, inner.products(n, layer.gate_up))
            want = _product(layer.gate_up, None, x, inner.products(n, layer.gate_up))
        assert got.dtype == x.dtype and torch.equal(got, want), n
        assert got.shape == (n, extern.out)
        xk = x.to(extern.dtype or x.dtype)
        torch.library.opcheck(torch.ops.rankone.product.default, (xk, extern.key))


def test_steps_run_eagerly_where_the_graph_cannot_run(
    backbones: dict[str, Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = backbones["llama"]
    fused = choose_forward(backbone)
    assert isinstance(fused, FusedLlama)
    tasks = make_tasks(backbone)
    req = request(backbone, tasks[0], TEXTS[0], "r", max_new_tokens=6)
    expected = reference_generate(backbone, req.task, req.input_ids, 6)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no C++ compiler")

    failing = CompiledStep(fused)  # a compile that fails: eager, said why
    monkeypatch.setattr(torch, "compile", refuse)
    failing.prepare()
    assert failing.off is not None and "no C++ compiler" in failing.off
    assert failing.kind == "fused"  # what /v1/info reports: not compiled
    assert decode_alone(backbone, failing, req) == expected and failing.steps == 0
    monkeypatch.undo()

    unfit = compiled(backbone)  # a graph whose guards refuse the inputs: that step eager

    class Refusing:
        def guard_check(self, *args: Any) -> bool:
            return False

        def __call__(self, *args: Any) -> Any:
            raise AssertionError("a graph whose guards refused the step ran it")

    monkeypatch.setitem(unfit.graphs, False, Refusing())
    monkeypatch.setitem(unfit.graphs, True, Refusing())
    misses = unfit.misses
    assert decode_alone(backbone, unfit, req) == expected
    assert unfit.misses - misses == len(expected) - 1


def test_the_guards_kept_are_the_steps_inputs(backbones: dict[str, Backbone]) -> None:
    """A compiled step checks Dynamo's guards over its arguments only (not over its own
    weights): inputs the graph was not traced for are refused (the step then runs eagerly)."""
    forward = compiled(backbones["llama"])

    def scratch_step(rows: int) -> list[Any]:
        kv, tokens, positions = forward._scratch(rows)
        return [tokens, positions, kv.mask, kv.keys, kv.values, kv.start, kv.end]

    with torch.inference_mode():  # as the engine's caches are made and its steps run
        for several, rows in ((False, 1), (True, 3)):
            graph = forward.graphs[several]
            step = scratch_step(rows)
            assert graph.guard_check(forward, *step), several
            wrong = {
                0: step[0].int(),  # tokens of another dtype
                1: step[1][:, None],  # positions of another rank
                3: step[3][:-1],  # keys a layer short
                4: [v.to(torch.float64) for v in step[4]],  # values of another dtype
            }
            for i, bad in wrong.items():
                assert not graph.guard_check(forward, *step[:i], bad, *step[i + 1 :]), (several, i)
        assert not forward.graphs[False].guard_check(forward, *scratch_step(2))


def test_the_setting_is_refused_where_it_cannot_run(backbones: dict[str, Backbone]) -> None:
    with pytest.raises(ValueError, match="RANKONE_COMPILED_STEP compiles"):
        choose_forward(backbones["gpt2"], compiled=True)
    with pytest.raises(ValueError, match="RANKONE_FUSED_FORWARD is false"):
        choose_forward(backbones["llama"], fused=False, compiled=True)
    for env in ({"engine": "static"}, {"fused_forward": False}):
        with pytest.raises(ValueError, match="RANKONE_COMPILED_STEP compiles the continuous"):
            Settings(model="m", compiled_step=True, **env)  # type: ignore[arg-type]
    assert Settings(model="m", compiled_step=True).compiled_step
    assert not Settings(model="m").compiled_step


def test_the_engine_compiles_before_it_is_started(backbones: dict[str, Backbone]) -> None:
    """``start`` returns once the model thread has compiled the step (readiness waits for
    it: no request queues behind a compile); a lone request's steps then run compiled."""
    import asyncio

    from service.engine.continuous import ContinuousEngine

    backbone = backbones["llama"]
    req = request(backbone, make_tasks(backbone)[2], TEXTS[2], "e", max_new_tokens=8)

    async def main() -> tuple[Any, Any, bool]:
        engine = ContinuousEngine(backbone, prefix_cache_bytes=1 << 20, compiled_step=True)
        forward = engine.loop_core.forward
        assert isinstance(forward, CompiledStep) and engine.forward_kind == "fused+compiled"
        await engine.start()
        prepared = forward.prepared and set(forward.graphs) == {False, True}
        steps = forward.steps
        result = await engine.generate(req)
        await engine.shutdown()
        return result, forward.steps - steps, prepared

    result, steps, prepared = asyncio.run(asyncio.wait_for(main(), timeout=300))
    assert prepared and steps == len(result.token_ids) - 1
    assert result.token_ids == reference_generate(backbone, req.task, req.input_ids, 8)


def test_a_half_precision_model_compiles_within_its_rounding(tiny_model_dirs: Any) -> None:
    """A bfloat16 backbone (``RANKONE_DTYPE``): its steps compile in its own dtype and
    a one-row step's logits stay within bfloat16's rounding of the eager step's (eagerly every operator
    rounds to 8 bits; compiled, values fused in one loop are rounded once, so greedy tokens
    part at near ties, as two bfloat16 kernels' would)."""
    from prompts import load_backbone

    backbone = load_backbone(tiny_model_dirs["llama"], dtype="bfloat16")
    forward = compiled(backbone)
    tasks = make_tasks(backbone)
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
    loop.admit([row(request(backbone, tasks[0], TEXTS[0], "h", max_new_tokens=40))[0]])
    for _ in range(12):  # a few steps in: the cache holds compiled steps' keys and values
        loop.step()
    with torch.inference_mode():
        loop.batch.kv.open_column()
        inputs = loop.batch.step_inputs()
        eager, fast = forward.inner.step(inputs), forward.step(inputs)
    assert fast.dtype == eager.dtype == torch.bfloat16
    scale = float(eager.float().abs().max())
    err = float((fast.float() - eager.float()).abs().max())
    assert err < 0.03 * scale, (err, scale)  # 1.3 % measured
    assert forward.steps >= 12 and forward.misses == 0


def test_precompiled_graphs_are_named_without_a_random_part() -> None:
    """AOTAutograd's on-disk cache keys a precompiled graph by its name: a name with a uuid in it
    missed in every new process (each start paid the whole compile). While compiling, the names
    keep only their counter; outside, Dynamo's own naming is back."""
    with _stable_graph_names():
        inside = dynamo_output.unique_id("__compiled_fn", with_uuid=True)
        plain = dynamo_output.unique_id("__resume")
    outside = dynamo_output.unique_id("__compiled_fn", with_uuid=True)
    assert re.fullmatch(r"__compiled_fn_\d+_rankone", inside)
    assert re.fullmatch(r"__resume_\d+", plain)
    assert re.fullmatch(r"__compiled_fn_\d+_[0-9a-f_]{36}", outside)
