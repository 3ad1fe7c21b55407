"""The forward seam: how the engine runs the backbone, chosen once when the engine is built.

The engine asks one ``Forward`` for three things and knows nothing of how they are done:

- ``embed`` input token ids [B, T] → their embeddings [B, T, d];
- ``prefill`` rows given their embeddings (a task's prompt rows, then its input tokens), after
  an optional cached past (a task prompt's keys/values): the next-token logits and every
  layer's keys/values, which the engine keeps (``PrefixCache``, ``SlotKV``);
- ``step`` the running batch: one token per row, written into the slot cache's open column.

Seq2seq backbones prefill through ``prefill_seq2seq`` (encoder over ``[P; x]``, then the first
decoder step); only the HF forward covers them.

Implementations: ``hf_forward.HFForward`` (the model's own forward, any backbone) and
``fused_llama.FusedLlama`` (Llama-family decoders). ``forwards.choose_forward`` picks one.
A new backend (8-bit weights, a CUDA-graph step, llama.cpp fed with input embeddings) is one
more subclass in its own file and one entry in ``forwards.py``. Every implementation keeps
the correctness anchor: in float32, greedy rows of a mixed batch yield what ``generate``
yields for each alone.
"""

from __future__ import annotations

import abc
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from torch import Tensor

from service.engine.kv_cache import SlotKV
from service.engine.kv_layout import KV


@dataclass
class EncoderSide:
    """A seq2seq running batch's encoder state, fixed from each row's prefill on."""

    states: Tensor  # [n, S, d] encoder output
    mask: Tensor  # [n, S] 1 = a real encoder position
    cross: list[KV]  # per decoder layer, cross-attention keys/values [n, H, S, Dh]


@dataclass
class StepInputs:
    """What one decode step of the running batch (n rows) feeds the forward."""

    tokens: Tensor  # [n] the token each row feeds
    positions: Tensor  # [n] its position id (decoder-only; empty for seq2seq)
    kv: SlotKV  # self-attention cache: the step writes its column at the open column
    mask: Tensor  # [n, 1, 1, W + 1] the window and the new column (bool, or additive float)
    encoder: EncoderSide | None = None  # seq2seq only


@dataclass
class Seq2SeqPrefill:
    """An encoder pass over ``[P; x]`` and the first decoder step, for b rows."""

    logits: Tensor  # [b, V] next-token logits
    layers: list[KV]  # decoder self-attention, per layer [b, H, 1, Dh]
    encoder: EncoderSide


class Forward(abc.ABC):
    """Runs the backbone for the engine (one thread: the model's)."""

    kind: ClassVar[str]  # reported by /v1/info as "forward"

    @abc.abstractmethod
    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings [B, T, d] for ``ids`` [B, T]."""

    @abc.abstractmethod
    def prefill(
        self, embeds: Tensor, positions: Tensor, mask: Tensor, past: list[KV] | None = None
    ) -> tuple[Tensor, list[KV]]:
        """A decoder-only prefill of ``embeds`` [B, T, d] at ``positions`` [B, T] after
        ``past`` (per layer [B, H, P, Dh], or none); ``mask`` [B, P + T] 1 = a real column
        (left padding). Returns the logits after the last column [B, V] and per layer the
        keys/values [B, H, P + T, Dh]."""

    @abc.abstractmethod
    def step(self, inputs: StepInputs) -> Tensor:
        """One decode step: next-token logits [n, V]; each layer's new keys/values are
        written at ``inputs.kv``'s open column."""

    def products_by(self) -> str:
        """Whose kernels run the products of a few rows (``/v1/info``'s ``kernels``):
        ``rankone`` (its own CPU kernels, ``one_row``) or ``torch`` (torch's BLAS and
        oneDNN, or the GPU's)."""
        return "torch"

    def prepare(self) -> None:  # noqa: B027 (optional: most forwards have nothing to do)
        """Whatever the forward does once before serving (the engine's model thread calls it
        first: compiling, timing its choices); nothing by default."""

    def prefill_seq2seq(self, embeds: Tensor, mask: Tensor) -> Seq2SeqPrefill:
        """The encoder over ``embeds`` [B, S, d] (``mask`` [B, S], right padding), then the
        decoder's first step."""
        raise NotImplementedError(f"the {self.kind} forward runs decoder-only backbones only")


S = TypeVar("S", bound="StepOf")


class StepOf(Forward):
    """A forward whose decode steps run another way than ``inner``'s (CUDA graphs, a
    compiled step); its embeddings and prefills are ``inner``'s. One per ``inner`` and kind
    (``of``): its state (graphs, a compiled graph) belongs to that forward."""

    _built: ClassVar[weakref.WeakKeyDictionary[Forward, dict[type, StepOf]]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, inner: Forward) -> None:
        self.inner = inner

    @classmethod
    def of(cls: type[S], inner: Forward) -> S:
        """This kind's forward over ``inner``, built once."""
        built = StepOf._built.setdefault(inner, {})
        if cls not in built:
            built[cls] = cls(inner)
        made = built[cls]
        assert isinstance(made, cls)
        return made

    def embed(self, ids: Tensor) -> Tensor:
        return self.inner.embed(ids)

    def products_by(self) -> str:
        return self.inner.products_by()

    def prefill(
        self, embeds: Tensor, positions: Tensor, mask: Tensor, past: list[KV] | None = None
    ) -> tuple[Tensor, list[KV]]:
        return self.inner.prefill(embeds, positions, mask, past)


def fastest(fn: Callable[[], object], repeats: int = 5) -> float:
    """The least of ``repeats`` timings of ``fn`` (seconds), after one untimed call: how a
    forward times its choices when it is built (``fn`` waits for a GPU itself)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
