"""The fused Llama forward computes what the HF forward computes: decode steps on the running
batch's slot cache, prefills with and without a cached prompt prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prompts import Backbone, load_backbone
from service.engine import one_row
from service.engine.decode import DecodeLoop
from service.engine.forwards import choose_forward
from service.engine.fused_llama import (
    LINEAR_BUCKETS,
    Bf16Weight,
    FusedLlama,
    Products,
    _fuse,
    _product,
    kernels_run,
)
from service.engine.graphed import GraphedStep, _Graph
from service.engine.hf_forward import HFForward
from service.engine.prefill import Prefiller
from service.engine.prefix_cache import PrefixCache
from service.engine.rows import LoopStats
from tests.engine.conftest import DEVICE, TEXTS, make_tasks, reference_generate, request, row
from tests.engine.test_decode_reference import run_schedule
from tests.tiny_models import build_tiny_llama


def _tiny_llama(**overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(params=["weight-major", "linear", "kernels"])
def orientation(
    request: pytest.FixtureRequest, backbones: dict[str, Backbone], monkeypatch: pytest.MonkeyPatch
) -> str:
    """The float32 products of several rows computed weight-major, or by ``F.linear``, and of
    one row as a two-column GEMM or as a GEMV (which ones run is measured per CPU: each must
    compute the HF forward's numbers); or, of up to 8 rows, by rankone's kernels (where they
    run: a CPU with AVX-512), the others weight-major."""
    fused = FusedLlama.build(backbones["llama"].model)
    assert fused is not None
    kernels = request.param == "kernels"
    if kernels and not kernels_run(fused.head.device):
        pytest.skip(f"rankone's kernels do not run here: {one_row.load()}")
    linear = request.param == "linear"
    monkeypatch.setattr(fused, "kernels", kernels)
    monkeypatch.setattr(fused, "linear_rows", frozenset(LINEAR_BUCKETS) if linear else frozenset())
    monkeypatch.setattr(fused, "one_row_gemv", {torch.float32: linear})
    return str(request.param)


def test_both_orientations_compute_the_same_product() -> None:
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(48, 32, generator=g), torch.randn(48, 1, generator=g)
    for n in (1, 2, 5, 32, 40):
        x = torch.randn(n, 32, generator=g)
        expected = torch.nn.functional.linear(x, w, bias[:, 0])
        kernels = kernels_run(torch.device("cpu")) and n <= one_row.MAX_ROWS  # (where they run)
        kernel = [Products(kernel=True)] if kernels else []
        for how in (Products(), Products(linear=True), Products(gemv=True), *kernel):
            got = _product(w, bias, x, how)
            assert got.shape == (n, 48)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_products_of_up_to_8_rows_run_rankones_kernels_where_they_run() -> None:
    """Where the kernels run (``kernels_run``: a CPU with AVX-512), a forward's products of 1 to
    ``one_row.MAX_ROWS`` rows are theirs (each row's numbers the same bits whatever rows are
    beside it), a matrix the kernels do not take (rows not a multiple of 32 long) the BLAS's."""
    fused = FusedLlama.build(_tiny_llama())
    assert fused is not None
    assert fused.kernels == kernels_run(torch.device("cpu")) == (one_row.load() is None)
    for rows in (1, 2, 8, 9, 32):
        kernel = fused.kernels and rows <= one_row.MAX_ROWS
        assert fused.products(rows, fused.head).kernel == kernel
    if not fused.kernels:
        pytest.skip(f"rankone's kernels do not run here: {one_row.load()}")
    g = torch.Generator().manual_seed(1)
    taken, refused = torch.randn(48, 32, generator=g), torch.randn(32, 48, generator=g)
    x = torch.randn(8, 32, generator=g)
    got = _product(taken, None, x, Products(kernel=True))
    assert torch.equal(got, one_row.product(x, taken))  # the kernel's product ...
    alone = [_product(taken, None, x[i : i + 1], Products(kernel=True)) for i in range(8)]
    assert torch.equal(torch.cat(alone), got)  # ... each row's bits as alone
    x48 = torch.randn(3, 48, generator=g)
    assert torch.equal(_product(refused, None, x48, Products(kernel=True)), x48 @ refused.t())


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_kernels_turned_off_leave_the_blas_products(
    backbones: dict[str, Backbone], weights: str
) -> None:
    """``RANKONE_CPU_KERNELS=false`` (``choose_forward(kernels=False)``): the same forward's
    twin, built once, sharing its weights, whose products never run rankone's kernels and whose
    rows still decode what HF ``generate`` does (float32)."""
    backbone = backbones["llama"]
    on = choose_forward(backbone, weights=weights)
    off = choose_forward(backbone, weights=weights, kernels=False)
    assert isinstance(on, FusedLlama) and isinstance(off, FusedLlama)
    assert off is choose_forward(backbone, weights=weights, kernels=False)  # built once
    assert off.kind == on.kind and off.step_layers is on.step_layers and off.head is on.head
    assert not off.kernels and off.products_by() == "torch"
    assert on.products_by() == ("rankone" if kernels_run(torch.device(DEVICE)) else "torch")
    assert not any(off.products(n, off.head).kernel for n in (1, 2, 8))
    if weights == "float32":
        loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=off)
        for req, sink in run_schedule(backbone, loop):
            want = reference_generate(backbone, req.task, req.input_ids, req.params.max_new_tokens)
            assert sink.result is not None and sink.result.token_ids == want, req.request_id


def _compare_steps(loop: DecodeLoop, steps: int) -> None:
    """Step ``loop`` with the fused kernel; before each step, check it against the HF forward."""
    batch = loop.batch
    assert isinstance(batch.forward, FusedLlama)
    hf = HFForward(loop.backbone)
    for _ in range(steps):
        with torch.inference_mode():
            batch.kv.open_column()
            expected = hf.step(batch.step_inputs())  # writes the open column too: same numbers
            got = batch.forward.step(batch.step_inputs())
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * scale)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        loop.step()  # the step proper (rewrites the same column with the fused numbers)


@pytest.mark.parametrize(("bool_mask", "first"), [(True, 2), (False, 2), (True, 1)])
def test_fused_step_equals_hf_forward_on_a_mixed_batch(
    backbones: dict[str, Backbone], bool_mask: bool, first: int, orientation: str
) -> None:
    """``first`` rows step alone, then the others join (1: the single-column product path)."""
    backbone = backbones["llama"]
    tasks = make_tasks(backbone)
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24))
    loop.batch.bool_mask = bool_mask  # False: the additive float mask of non-SDPA kernels
    rows = [
        row(request(backbone, tasks[i], TEXTS[i], f"r{i}", max_new_tokens=50)) for i in range(4)
    ]
    loop.admit([r for r, _ in rows[:first]])  # then the others, of other lengths, join
    _compare_steps(loop, 3)
    loop.admit([r for r, _ in rows[first:]])
    _compare_steps(loop, 5)
    assert loop.running == 4


@pytest.mark.parametrize("cached", [False, True])
def test_fused_prefill_equals_hf_forward(
    backbones: dict[str, Backbone], cached: bool, orientation: str
) -> None:
    """Left-padded groups of different lengths, with and without a cached prompt prefix."""
    backbone = backbones["llama"]
    tasks = make_tasks(backbone)
    fused = FusedLlama.build(backbone.model)
    assert fused is not None
    out = []
    for kernel in (fused, HFForward(backbone)):
        prefix = PrefixCache(1 << 24) if cached else None
        prefill = Prefiller(backbone, prefix, LoopStats(), kernel)
        rows = [row(request(backbone, tasks[i], TEXTS[i], f"r{i}"))[0] for i in range(4)]
        with torch.inference_mode():
            prefill(rows[:1])  # a first group fills the prefix cache for task 0
            out.append(prefill(rows))
    got, expected = out
    assert torch.equal(got.mask, expected.mask)
    scale = float(expected.logits.abs().max())
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=2e-5 * scale)
    assert torch.equal(got.logits.argmax(-1), expected.logits.argmax(-1))
    real = got.mask.bool()[:, None, :, None]  # padding columns hold whatever; nothing reads them
    assert len(got.layers) == len(expected.layers)
    for (k1, v1), (k2, v2) in zip(got.layers, expected.layers, strict=True):
        assert k1.shape == k2.shape and v1.shape == v2.shape
        torch.testing.assert_close(k1 * real, k2 * real, rtol=0, atol=1e-4 * float(k2.abs().max()))
        torch.testing.assert_close(v1 * real, v2 * real, rtol=0, atol=1e-4 * float(v2.abs().max()))
        assert torch.isfinite(k1).all() and torch.isfinite(v1).all()


@pytest.mark.parametrize("fused", [True, False])
def test_mixed_batch_matches_generate_with_either_kernel(
    backbones: dict[str, Backbone], fused: bool, orientation: str
) -> None:
    backbone = backbones["llama"]
    forward = choose_forward(backbone, fused=fused)
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
    assert (loop.batch.forward.kind == "fused") == fused
    for req, sink in run_schedule(backbone, loop):
        expected = reference_generate(backbone, req.task, req.input_ids, req.params.max_new_tokens)
        assert sink.result is not None and sink.result.token_ids == expected, req.request_id


def _reallocating_run(backbone: Backbone, loop: DecodeLoop, monkeypatch: pytest.MonkeyPatch) -> int:
    """``run_schedule`` (rows joining and leaving), then more rows at once than the cache has
    slots (8), so that the slot buffers are reallocated; every row must equal HF ``generate``
    alone. Returns how many slot buffers the steps wrote into."""
    generations = set()
    original = loop.batch.kv.open_column

    def open_column() -> None:
        original()
        generations.add(loop.batch.kv.keys[0].data_ptr())

    monkeypatch.setattr(loop.batch.kv, "open_column", open_column)
    done = run_schedule(backbone, loop)
    tasks = make_tasks(backbone)
    more = [
        row(request(backbone, tasks[i % 4], TEXTS[i % 4], f"more{i}", max_new_tokens=6))
        for i in range(12)
    ]
    loop.admit([r for r, _ in more])
    while loop.running:
        loop.step()
    for req, sink in [*done, *((r.request, sink) for r, sink in more)]:
        expected = reference_generate(backbone, req.task, req.input_ids, req.params.max_new_tokens)
        assert sink.result is not None and sink.result.token_ids == expected, req.request_id
    return len(generations)


def test_fixed_shape_step_matches_generate(
    backbones: dict[str, Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step a CUDA graph captures (``step_full``: over the slot cache's whole capacity,
    the write column a device tensor), rows joining and leaving, then the slot buffers
    reallocated: each row = HF ``generate`` alone. On a CUDA device
    (``RANKONE_TEST_DEVICE=cuda``) really captured once per row count and buffers, replayed,
    and captured again into a new memory pool on the new buffers (the capture that failed on
    an H200 before the fix); elsewhere the same step eagerly."""
    backbone = backbones["llama"]
    fused = choose_forward(backbone)
    assert isinstance(fused, FusedLlama)
    on_gpu = backbone.device.type == "cuda"
    graphed = GraphedStep(fused, capture=on_gpu)
    pools = []
    if on_gpu:
        capture = graphed._capture

        def counted(*args: object) -> _Graph:
            graph = capture(*args)  # type: ignore[arg-type]
            pools.append(graphed.pool)
            return graph

        monkeypatch.setattr(graphed, "_capture", counted)
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=graphed)
    buffers = _reallocating_run(backbone, loop, monkeypatch)
    assert buffers >= 2
    assert graphed.off is None
    assert (graphed.captures > 0) == on_gpu and graphed.kind in ("fused+graphs", "fused+full")
    if on_gpu:  # graphs captured on each set of buffers, each set into its own pool
        assert len(set(pools)) >= 2 and graphed.captures == len(pools)
    # the serving engine's choice: graphs on a CUDA device only, one graphed forward per model
    chosen = choose_forward(backbone, graphs=True)
    assert (chosen is GraphedStep.of(fused)) if on_gpu else (chosen is fused)


@pytest.mark.skipif(
    DEVICE != "cuda",
    reason="a real CUDA capture failing (RANKONE_TEST_DEVICE=cuda); test_graph_bookkeeping "
    "checks the same fallback everywhere with a stand-in capture",
)
def test_a_failed_capture_leaves_greedy_and_sampled_rows_working(
    backbones: dict[str, Backbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture that really fails on the GPU (the step reads a number back to the host while
    the stream is being captured): graphs turn off, and the same rows then decode eagerly,
    greedy ones = HF ``generate``, seeded sampled ones = the same requests on the plain fused
    forward (a failed capture once left the CUDA generator unusable for sampling)."""
    backbone = backbones["llama"]
    fused = choose_forward(backbone)
    assert isinstance(fused, FusedLlama)
    tasks = make_tasks(backbone)

    def rows() -> list:
        greedy = [request(backbone, tasks[i], TEXTS[i], f"g{i}", max_new_tokens=6) for i in (0, 1)]
        sampled = [
            request(
                backbone,
                tasks[i],
                TEXTS[i],
                f"s{i}",
                max_new_tokens=6,
                temperature=0.9,
                top_p=0.95,
                seed=10 + i,
            )
            for i in (2, 3)
        ]
        return [row(r) for r in (*greedy, *sampled)]

    def run(forward: object) -> list[list[int]]:
        loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
        admitted = rows()
        loop.admit([r for r, _ in admitted])
        while loop.running:
            loop.step()
        out = []
        for r, sink in admitted:
            assert sink.result is not None, r.request.request_id
            out.append(sink.result.token_ids)
        return out

    plain = run(fused)
    step_full = fused.step_full

    def syncing(*args: object) -> torch.Tensor:
        logits = step_full(*args)  # type: ignore[arg-type]
        if torch.cuda.is_current_stream_capturing():
            logits.sum().item()  # a host sync: not allowed while capturing
        return logits

    monkeypatch.setattr(fused, "step_full", syncing)
    stream = torch.cuda.current_stream(backbone.device)
    graphed = GraphedStep(fused)
    assert run(graphed) == plain
    assert graphed.off is not None and graphed.captures == 0
    for (r, _), tokens in zip(rows()[:2], plain[:2], strict=True):
        req = r.request
        assert tokens == reference_generate(backbone, req.task, req.input_ids, 6)
    # what the failed capture left is undone: the stream current before is current again,
    # the device's default generator draws (it raised before the fix), and a capture works
    assert torch.cuda.current_stream(backbone.device) == stream
    torch.manual_seed(5)
    first = torch.randn(8, device=backbone.device)
    torch.manual_seed(5)
    assert torch.equal(torch.randn(8, device=backbone.device), first)
    monkeypatch.undo()  # the plain step_full again
    again = GraphedStep(fused)
    assert run(again)[:2] == plain[:2]  # the greedy rows, now from graphs
    assert again.off is None and again.captures > 0


@pytest.mark.parametrize("fail_at", [None, 2])
def test_graph_bookkeeping(
    backbones: dict[str, Backbone], monkeypatch: pytest.MonkeyPatch, fail_at: int | None
) -> None:
    """GraphedStep's bookkeeping, with a stand-in for the CUDA capture whose replay runs the
    fixed-shape step on the graph's own input tensors: one graph per row count on the current
    slot buffers, all dropped (and their memory pool with them) when the buffers change, the
    inputs copied in before each replay; a failed capture turns graphs off and the step runs
    eagerly from then on. Every row still equals HF ``generate`` alone."""
    backbone = backbones["llama"]
    fused = choose_forward(backbone)
    assert isinstance(fused, FusedLlama)
    seen: list[tuple[int, bool, bool]] = []  # per capture: rows, fresh pool, first on buffers

    def capture(self: GraphedStep, inputs, n: int, column: torch.Tensor) -> _Graph:  # type: ignore[no-untyped-def]
        if fail_at is not None and len(seen) + 1 == fail_at:
            raise RuntimeError("capture failed")
        kv = inputs.kv
        g = _Graph(None, inputs.tokens.clone(), inputs.positions.clone(), column.clone(), column)

        class Replay:
            def replay(self_) -> None:  # type: ignore[no-untyped-def]
                g.logits = fused.step_full(g.tokens, g.positions, kv, n, g.column)

        g.graph = Replay()
        seen.append((n, self.pool is None, not self.graphs))
        self.pool = object()  # what torch.cuda.graph_pool_handle() would give
        self.captures += 1
        return g

    monkeypatch.setattr(GraphedStep, "_capture", capture)
    graphed = GraphedStep(fused)
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=graphed)
    generations = _reallocating_run(backbone, loop, monkeypatch)
    if fail_at is None:
        assert graphed.off is None and len(seen) >= 2
        rows_seen = [n for n, _, _ in seen]
        assert len(set(rows_seen)) >= 2  # rows joined and left: several row counts
        assert generations >= 2  # and the slot buffers were reallocated on the way
        # a row count is captured again only on new buffers ...
        assert len(rows_seen) - len(set(rows_seen)) <= generations - 1
        # ... and the first capture on new buffers goes into a fresh memory pool (torch frees
        # a pool with its last graph), the others into that one
        assert all(fresh == first for _, fresh, first in seen)
    else:
        assert graphed.off == "RuntimeError: capture failed" and len(seen) == fail_at - 1


def test_fusing_shares_the_weights_and_keeps_the_hf_forward_exact() -> None:
    model = _tiny_llama()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    params = sum(p.numel() for p in model.parameters())
    decoder = FusedLlama.build(model)
    assert decoder is not None and FusedLlama.build(model) is decoder  # fused once per model
    attn = model.model.layers[0].self_attn
    qkv = decoder.layers[0].qkv
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()  # a view: no weight stored twice
    assert attn.v_proj.weight.data_ptr() == qkv[-attn.v_proj.weight.shape[0] :].data_ptr()
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_biased_llama_fused_step_equals_hf_forward(tmp_path: Path) -> None:
    """Llama variants with attention/MLP biases (the fused step adds them in the GEMMs)."""
    backbone = load_backbone(build_tiny_llama(tmp_path / "llama"), device=DEVICE)
    model = backbone.model
    with torch.no_grad():  # give the same model biases: attention_bias / mlp_bias variants
        for layer in model.model.layers:
            for lin in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
                layer.mlp.down_proj,
            ):
                lin.bias = torch.nn.Parameter(
                    torch.randn(lin.out_features, device=lin.weight.device) * 0.5
                )
    tasks = make_tasks(backbone)
    loop = DecodeLoop(backbone)
    rows = [
        row(request(backbone, tasks[i], TEXTS[i], f"r{i}", max_new_tokens=40)) for i in range(3)
    ]
    loop.admit([r for r, _ in rows])
    fused = loop.batch.forward
    assert isinstance(fused, FusedLlama) and fused.layers[0].qkv_bias is not None
    _compare_steps(loop, 6)


def test_copies_take_the_base_forwards_state_not_its_patches() -> None:
    base = FusedLlama.build(_tiny_llama())
    assert base is not None
    vars(base)["prefill"] = lambda *args: None  # an instance attribute shadowing a method
    low = base.decode_copies("bfloat16")
    assert "prefill" not in vars(low) and low.prefill.__func__ is FusedLlama.prefill  # type: ignore[attr-defined]
    assert low.layers is base.layers and low.embed_tokens is base.embed_tokens
    assert torch.float32 in low.one_row_gemv
    # bfloat16's one-row choice is measured only where its copies are plain matrices (oneDNN's
    # prepacked copies run their own kernel at every row count)
    assert isinstance(low.step_head, Bf16Weight)
    assert (torch.bfloat16 in low.one_row_gemv) == (low.step_head.prepacked is None)


def test_fusing_refuses_a_partial_bias() -> None:
    model = _tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.q_proj.bias = torch.nn.Parameter(torch.zeros(attn.q_proj.out_features))
    with pytest.raises(ValueError, match="all have a bias or none"):
        _fuse([attn.q_proj, attn.k_proj, attn.v_proj])


@pytest.mark.parametrize(
    ("kind", "overrides", "covered"),
    [
        ("t5", {}, False),
        ("gpt2", {}, False),
        ("llama", {}, True),
        ("llama", {"pretraining_tp": 2}, False),
        ("llama", {"hidden_act": "gelu"}, False),
    ],
)
def test_what_the_fused_step_covers(
    backbones: dict[str, Backbone], kind: str, overrides: dict[str, object], covered: bool
) -> None:
    model = _tiny_llama(**overrides) if overrides else backbones[kind].model
    assert (FusedLlama.build(model) is not None) == covered
