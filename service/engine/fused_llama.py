"""A lean forward for Llama-family decoders: fused projections, weight-major GEMMs.

The engine's forwards through the backbone are small: a decode step feeds one token per
running request, a cached-prefix prefill the few tokens of a question. Their matrix products
have few rows against weights with hundreds of columns and, on a CPU, are bound by reading the
weights, not by FLOPs. Two things make that read cheaper than Hugging Face's forward does:

- **Fused projections.** q/k/v become one ``[Nq + 2 Nkv, d]`` matrix and gate/up one
  ``[2 I, d]``: two GEMMs per layer instead of five, each reading its weights once. The fused
  matrices are built once per model and the model's own ``q_proj``/``k_proj``/... parameters
  become views of them, so no weight is stored twice and the HF forward (``generate``, the
  trainer) reads the same numbers as before.
- **Weight-major products.** Every product is computed as ``(W @ hᵀ)ᵀ`` with ``hᵀ`` a view of
  the contiguous activations ``h`` [rows, d], instead of ``F.linear``'s ``h @ Wᵀ``: on this
  CPU's BLAS the same weights are read 1.2–2.5× faster at 2–32 rows (``python -m bench.step_rows``
  records the step by rows with either forward).

Everything else is the HF Llama forward (RMSNorm in float32, the model's own rotary-embedding
module, SDPA with the same GQA handling), reading and writing the engine's caches directly:
``step`` writes into the running batch's slot cache, ``prefill`` extends per-layer keys/values
(a cached prompt prefix, or nothing). The numbers equal the HF forward's to float32 rounding
(the products' reduction order differs), not bit for bit: a greedy token can flip only at a
near tie.

It is one implementation of the engine's forward seam (``forward.Forward``).
``FusedLlama.build`` returns ``None`` for what it does not cover (seq2seq, other
architectures, sliding-window attention, tensor-parallel Llama, a non-SiLU MLP); the engine
then runs the HF forward (``forwards.choose_forward``).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.engine.forward import Forward, StepInputs
from service.engine.kv_layout import KV

log = logging.getLogger("rankone.engine")

_ARCHITECTURES = frozenset({"llama"})
# One decoder per model: building fuses the model's weights, which must happen once.
_BUILT: weakref.WeakKeyDictionary[nn.Module, FusedLlama] = weakref.WeakKeyDictionary()
# attend(layer, keys, values) -> the layer's keys/values to attend over (this call's included)
Attend = Callable[[int, Tensor, Tensor], KV]


def _fuse(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """One matrix for ``linears`` (stacked on the output dim); the modules keep views of it."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    if any(b is not None for b in biases) and not all(b is not None for b in biases):
        raise ValueError("fused projections must all have a bias or none")
    bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None  # type: ignore[union-attr]
    row = 0
    for lin in linears:
        out = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[row : row + out], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row : row + out], requires_grad=False)
        row += out
    return weight, None if bias is None else bias[:, None]


@dataclass(frozen=True)
class Int8Weight:
    """An 8-bit copy of a weight matrix: symmetric per-output-row scales (``w ≈ q · s``).

    Its products read a quarter of float32's bytes, with bfloat16 activations
    (``torch._weight_int8pack_mm``; the same kernel with float32 activations is ~10× slower on
    this CPU). Decode steps only: at 8 rows it runs ~3× faster than the float32 GEMM, at 64 and
    more ~1.2× slower (bench/results/int8_products.md), so prefills keep float32."""

    q: Tensor  # [N, d] int8
    scale: Tensor  # [N] bfloat16

    @classmethod
    def of(cls, w: Tensor) -> Int8Weight:
        scale = (w.abs().amax(dim=1).float() / 127.0).clamp_min(1e-12)
        q = torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.to(torch.bfloat16))

    def product(self, x: Tensor) -> Tensor:
        """``x @ wᵀ`` from the int8 copy: [n, d] -> [n, N] in ``x``'s dtype. On a CPU the
        int8 kernel; elsewhere (CUDA) the same numbers dequantized into one GEMM, which a
        compiled or graph-captured step fuses."""
        if x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.q, self.scale)
            return y.to(x.dtype)
        w = self.q.to(torch.bfloat16) * self.scale[:, None]
        return F.linear(x.to(torch.bfloat16), w).to(x.dtype)


Weight = Tensor | Int8Weight


def _product_t(weight: Weight, bias: Tensor | None, x: Tensor) -> Tensor:
    """``(x @ weightᵀ)ᵀ`` (+ bias) computed weight-major: [n, d] -> [N, n] (contiguous for a
    float32 weight; a transposed view for an int8 one)."""
    if isinstance(weight, Int8Weight):
        y = weight.product(x)  # [n, N]
        return (y if bias is None else y + bias.t()).t()
    one = x.shape[0] == 1
    if one:  # a single column goes to a GEMV that reads the weights at half the GEMM's rate
        x = x.expand(2, -1)
    xt = x.contiguous().t()  # [d, n] with unit stride along n: the BLAS's fast few-column path
    out = torch.mm(weight, xt) if bias is None else torch.addmm(bias, weight, xt)
    return out[:, :1] if one else out


def _product(weight: Weight, bias: Tensor | None, x: Tensor) -> Tensor:
    """``x @ weightᵀ`` (+ bias): [n, d] -> [n, N] (a transposed view of ``_product_t``)."""
    return _product_t(weight, bias, x).t()


def _rms_norm(h: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's Llama RMSNorm over the last dim (in float32, like HF)."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = attend) as an additive bias: 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def _decode_attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor | None) -> Tensor:
    """Softmax attention of ``q`` [B, H_kv, g, Dh] (pre-scaled) over ``keys``/``values``
    [B, H_kv, W, Dh] with an additive ``bias`` [B, 1, 1, W]: [B, H_kv, g, Dh].

    Two batched products and a softmax: at one query per row this runs in about two thirds of
    the time of CPU SDPA over the same views (its math path, taken here, also rescales the keys).
    Every row attends to its own new column, so no row is fully masked.
    """
    scores = torch.matmul(q, keys.transpose(-1, -2))  # [B, H_kv, g, W]
    if bias is not None:
        scores = scores + bias
    return torch.matmul(scores.softmax(-1), values)


def _repeat_kv(x: Tensor, group: int) -> Tensor:
    """[B, H_kv, W, Dh] -> [B, H_kv * group, W, Dh], each KV head repeated for its group."""
    if group == 1:
        return x
    b, h, w, dh = x.shape
    return x[:, :, None].expand(b, h, group, w, dh).reshape(b, h * group, w, dh)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _Layer:
    norm1: Tensor  # [d]
    eps1: float
    qkv: Weight  # [Nq + 2 Nkv, d]
    qkv_bias: Tensor | None
    o: Weight  # [d, Nq]
    o_bias: Tensor | None
    norm2: Tensor
    eps2: float
    gate_up: Weight  # [2 I, d]
    gate_up_bias: Tensor | None
    down: Weight  # [d, I]
    down_bias: Tensor | None

    def int8(self) -> _Layer:
        """This layer with 8-bit copies of its four weight matrices (norms, biases as they are)."""

        def q(w: Weight) -> Int8Weight:
            assert isinstance(w, Tensor), "already int8"
            return Int8Weight.of(w)

        return dataclasses.replace(
            self, qkv=q(self.qkv), o=q(self.o), gate_up=q(self.gate_up), down=q(self.down)
        )


def _unsupported(model: Any) -> str | None:
    """Why ``model`` is not covered, or None."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if getattr(config, "model_type", "") not in _ARCHITECTURES:
        return f"architecture {getattr(config, 'model_type', '?')!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "no model.layers / lm_head"
    if getattr(model.lm_head, "bias", None) is not None:
        return "an lm_head bias"
    return None


class FusedLlama(Forward):
    """Decode steps and prefills of a Llama-family model (see module doc)."""

    kind = "fused"

    def __init__(self, model: Any) -> None:
        config = model.config
        inner = model.model
        self.embed_tokens: nn.Embedding = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight.detach()
        self.norm_eps = float(inner.norm.variance_epsilon)
        self.head = model.lm_head.weight.detach()  # [V, d] (tied or not)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.scaling = float(inner.layers[0].self_attn.scaling)
        self.layers: list[_Layer] = []
        for layer in inner.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up, gate_up_bias = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append(
                _Layer(
                    norm1=layer.input_layernorm.weight.detach(),
                    eps1=float(layer.input_layernorm.variance_epsilon),
                    qkv=qkv,
                    qkv_bias=qkv_bias,
                    o=attn.o_proj.weight.detach(),
                    o_bias=None if attn.o_proj.bias is None else attn.o_proj.bias.detach()[:, None],
                    norm2=layer.post_attention_layernorm.weight.detach(),
                    eps2=float(layer.post_attention_layernorm.variance_epsilon),
                    gate_up=gate_up,
                    gate_up_bias=gate_up_bias,
                    down=mlp.down_proj.weight.detach(),
                    down_bias=(
                        None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach()[:, None]
                    ),
                )
            )

    @classmethod
    def build(cls, model: Any) -> FusedLlama | None:
        """The fused forward of ``model`` (built once), or None where it is not covered."""
        reason = _unsupported(model)
        if reason is not None:
            log.info("fused Llama forward off: %s; the engine runs the HF forward", reason)
            return None
        if model not in _BUILT:
            _BUILT[model] = cls(model)
        return _BUILT[model]

    def int8(self) -> FusedLlamaInt8:
        """This forward with 8-bit copies of the decoder layers' weights (see ``Int8Weight``);
        the embeddings and the lm_head stay float32. Built once per model."""
        return FusedLlamaInt8.of(self)

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)

    def step(self, inputs: StepInputs) -> Tensor:
        """A decode step: next-token logits [n, V] for ``inputs.tokens`` [n] at their
        positions [n]; each layer's new keys/values go to the slot cache's open column."""
        x = self.embed_tokens(inputs.tokens)[:, None]
        h = self._layers(
            x, inputs.positions[:, None], inputs.mask, inputs.kv.write, self.step_layers
        )
        return self._logits(h[:, -1])

    def prefill(
        self, embeds: Tensor, positions: Tensor, mask: Tensor, past: Sequence[KV] | None = None
    ) -> tuple[Tensor, list[KV]]:
        """See ``Forward.prefill``: ``embeds`` [B, T, d] after ``past`` (P columns, or none).

        Each query attends causally to the real columns up to its own, and always to itself
        (a padding query then stays finite; nothing reads it).
        """
        t, width = int(embeds.shape[1]), int(mask.shape[1])
        keys_ok = mask.bool()[:, None, None, :]  # [B, 1, 1, P + T]
        col = torch.arange(width, device=embeds.device)
        row = torch.arange(width - t, width, device=embeds.device)[:, None]  # query t's own column
        allowed = (keys_ok & (col <= row)) | (col == row)  # [B, 1, T, P + T]
        layers: list[KV] = []

        def attend(i: int, k: Tensor, v: Tensor) -> KV:
            if past is not None:
                k = torch.cat([past[i][0], k], dim=2)
                v = torch.cat([past[i][1], v], dim=2)
            layers.append((k, v))
            return k, v

        h = self._layers(embeds, positions, allowed, attend)
        return self._logits(h[:, -1]), layers

    def _logits(self, h: Tensor) -> Tensor:
        """[n, d] last hidden states -> [n, V] logits (final norm, lm_head)."""
        return _product(self.head, None, _rms_norm(h, self.norm, self.norm_eps)).contiguous()

    @property
    def step_layers(self) -> list[_Layer]:
        """The layers a decode step runs (prefills run ``layers``)."""
        return self.layers

    def _layers(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor,
        attend: Attend,
        layers: list[_Layer] | None = None,
    ) -> Tensor:
        """The decoder layers over ``x`` [B, T, d] at ``positions`` [B, T]: [B, T, d]."""
        b, t, d = (int(s) for s in x.shape)
        cos, sin = self.rotary(x, positions)  # [B, T, Dh]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh]: broadcast over heads
        dh, heads, kv_heads = self.head_dim, self.heads, self.kv_heads
        nq, nkv = heads * dh, kv_heads * dh
        group = heads // kv_heads
        h = x.reshape(b * t, d)  # the products' rows: every (row, position)
        bias = None
        q_cos, q_sin = cos, sin
        if t == 1:  # the decode step's mask as one additive bias for every layer, and the
            # attention's scale folded into the queries' rotation (no per-layer op)
            bias = mask if mask.is_floating_point() else _additive(mask, x.dtype)
            q_cos, q_sin = cos * self.scaling, sin * self.scaling
        for i, layer in enumerate(self.layers if layers is None else layers):
            qkv = _product(layer.qkv, layer.qkv_bias, _rms_norm(h, layer.norm1, layer.eps1))
            qkv = qkv.reshape(b, t, -1)
            q = qkv[..., :nq].reshape(b, t, heads, dh).transpose(1, 2)  # [B, H, T, Dh]
            k = qkv[..., nq : nq + nkv].reshape(b, t, kv_heads, dh).transpose(1, 2)
            v = qkv[..., nq + nkv :].reshape(b, t, kv_heads, dh).transpose(1, 2)
            q = q * q_cos + _rotate_half(q) * q_sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = attend(i, k, v)  # [B, H_kv, W, Dh], this call's columns included
            if t == 1:  # one query per row: a group's heads attend as queries of one KV head
                out = _decode_attention(q.reshape(b, kv_heads, group, dh), keys, values, bias)
            else:  # each query head over its KV head's keys (HF's repeat_kv)
                out = F.scaled_dot_product_attention(
                    q,
                    _repeat_kv(keys, group),
                    _repeat_kv(values, group),
                    attn_mask=mask,
                    scale=self.scaling,
                ).transpose(1, 2)  # [B, T, H, Dh]
            h = h + _product(layer.o, layer.o_bias, out.reshape(b * t, nq))
            # gate/up as [2 I, rows]: the activation runs over contiguous halves
            a = _product_t(layer.gate_up, layer.gate_up_bias, _rms_norm(h, layer.norm2, layer.eps2))
            inter = a.shape[0] // 2
            act = F.silu(a[:inter]).mul_(a[inter:])  # [I, rows]
            h = h + _product(layer.down, layer.down_bias, act.t())
        return h.reshape(b, t, d)


# One 8-bit forward per model, built from its float32 one (whose fused weights it shares).
_BUILT_INT8: weakref.WeakKeyDictionary[FusedLlama, FusedLlamaInt8] = weakref.WeakKeyDictionary()


class FusedLlamaInt8(FusedLlama):
    """The fused forward whose decode steps read 8-bit copies of the decoder layers' weights
    (``RANKONE_WEIGHTS=int8``); prefills, the embeddings and the lm_head stay float32. A row's
    numbers never depend on the other rows (a step's products are per row, and which weights
    a call reads depends on the call's kind only), so a mixed batch still decodes what each
    request decodes alone; against float32 it is not exact: its greedy agreement and task
    accuracy are measured (``python -m bench.int8_quality``)."""

    kind = "fused-int8"
    int8_layers: list[_Layer]

    @classmethod
    def of(cls, base: FusedLlama) -> FusedLlamaInt8:
        if base not in _BUILT_INT8:
            built = cls.__new__(cls)
            built.__dict__.update(base.__dict__)  # the same layers, embeddings, rotary, head
            built.int8_layers = [layer.int8() for layer in base.layers]
            _BUILT_INT8[base] = built
        return _BUILT_INT8[base]

    @property
    def step_layers(self) -> list[_Layer]:
        return self.int8_layers
