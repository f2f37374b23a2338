"""LyCORIS adapters: LoHa (Hadamard product), LoKr (Kronecker product) and full-weight differences.

Each is an `Adapter` (see `models.lora.layers`): the wrappers run base(x) + m * s * op(x, D) with
op the base layer's own linear / conv, D built from the factors on every forward pass (as
LyCORIS's default, non-bypass mode does), merge as W + m * D, and export under LyCORIS's
kohya-style key suffixes that ComfyUI, A1111/Forge and LyCORIS read.

LoHa, rank r, base weight W (out, in[, kh, kw]), k = kh*kw (1 for Linear):
    D = (w1a @ w1b) * (w2a @ w2b) * alpha / r,  w?a (out, r), w?b (r, in*k), reshaped like W.
    With `tucker` (3x3 convs): W?[o, i, h, w] = sum_ab t?[a, b, h, w] * w?a[a, o] * w?b[b, i],
    w?a (r, out), w?b (r, in), t? (r, r, kh, kw).
    Init (LyCORIS): w1b, w2b ~ N(0, 1), w1a ~ N(0, 0.1), t? ~ N(0, 0.1), w2a = 0, so D starts at 0.

LoKr, out = a*b and in = c*d split by `factorization(dim, factor)`:
    D = kron(w1, w2) * scale, reshaped like W; w1 (a, c), w2 (b, d[, kh, kw]).
    w1 is full unless `decompose_both` and r < max(a, c)/2 (then w1_a (a, r) @ w1_b (r, c)).
    w2 is full when r >= max(b, d)/2 ("full rank when rank is large"), else w2_a (b, r) @
    w2_b (r, d*k) (its row-major (b, d*k) layout is the flattened (b, d, kh, kw)), or with
    `tucker` on a 3x3 conv W2[p, q, h, w] = sum_ab t2[a, b, h, w] * w2_a[a, p] * w2_b[b, q].
    scale = alpha / r, r the rank of the low-rank factor (w2's when both are), as ComfyUI reads
    these files; with both factors full the scale is 1 whatever alpha (ComfyUI ignores it then,
    and LyCORIS writes alpha = r).
    Init (LyCORIS): w1 (or w1_a, w1_b), w2_a, t2 kaiming-uniform(a=sqrt(5)); w2 (or w2_b) = 0.

Full difference (import only): D = `diff` (like W) and the bias update `diff_b` (out,), no scale.

The base may be quantized (`models.quant`): the adapters only read its shape and device (and,
for DoRA, its dequantized weight through `models.lora.layers`).

Dropouts (LyCORIS): no dropout on hidden activations; `rank_dropout` zeroes whole output rows
of D with probability p per forward pass in training (not rescaled: LyCORIS's default
`rank_dropout_scale=False`); module dropout as for LoRA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import Adapter, base_device, weight_shape

__all__ = ["FullAdapter", "LoHaAdapter", "LoKrAdapter", "LoKrLayout", "factorization", "kron_delta",
           "loha_delta", "tucker_rebuild"]


# ------------------------------------------------------------------------------------------------
# The math, shared by the adapters and by file conversion (`lora resize`)
# ------------------------------------------------------------------------------------------------
def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dim and m <= n: (factor, dim / factor) sorted when `factor` > 0 divides
    dim, else m = the largest divisor of dim not above sqrt(dim) nor above `factor` (-1: no
    bound), i.e. the most square split allowed. LyCORIS's `factorization`: 1280 -> (32, 40),
    (1280, 8) -> (8, 160), 127 -> (1, 127)."""
    if dim < 1:
        raise ValueError(f"factorization: dimension must be >= 1, got {dim}")
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    limit = dim if factor < 0 else factor
    best, m = 1, 1
    while m * m <= dim:
        if dim % m == 0 and m <= limit:
            best = m
        m += 1
    return best, dim // best


def tucker_rebuild(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W[p, q, h, w] = sum_ij core[i, j, h, w] * a[i, p] * b[j, q]: core (r, r, kh, kw), a (r, P),
    b (r, Q) -> (P, Q, kh, kw)."""
    return torch.einsum("ijhw,ip,jq->pqhw", core, a, b)


def loha_delta(w1a, w1b, w2a, w2b, t1=None, t2=None) -> torch.Tensor:
    """(w1a @ w1b) * (w2a @ w2b), or with Tucker cores tucker_rebuild(t1, w1a, w1b) *
    tucker_rebuild(t2, w2a, w2b); no scale, not reshaped: (out, in*k) or (out, in, kh, kw)."""
    if t1 is None:
        return (w1a @ w1b) * (w2a @ w2b)
    return tucker_rebuild(t1, w1a, w1b) * tucker_rebuild(t2, w2a, w2b)


def kron_delta(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) for w1 (a, c) and w2 (b, d) or (b, d, kh, kw): (a*b, c*d[, kh, kw]); no scale."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


# ------------------------------------------------------------------------------------------------
# LoHa
# ------------------------------------------------------------------------------------------------
class _WeightAdapter(Adapter):
    """An adapter whose branch runs the base operation with its full-size update D."""

    def _finish_update(self, x: torch.Tensor, delta: torch.Tensor, use_multiplier: bool,
                       bias: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(op(x, D), scale) with LyCORIS rank dropout (whole output rows of D zeroed with
        probability p in training, one draw per forward pass, no 1/(1-p) rescale) and module
        dropout applied."""
        if self.training and self.rank_dropout > 0:
            keep = torch.rand(delta.shape[0], device=delta.device) >= self.rank_dropout
            delta = delta * keep.to(delta.dtype).reshape(-1, *([1] * (delta.dim() - 1)))
        u = self.apply_weight(self.input_as_float(x), delta, bias)
        if (keep_module := self.module_keep()) is not None:
            u = u * keep_module
        return u, (self.scale * self.multiplier if use_multiplier else self.scale)


class LoHaAdapter(_WeightAdapter):
    """LyCORIS LoHa on one Linear / Conv2d (see the module docstring for shapes and init)."""

    algo = "loha"

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, *, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, dora: bool | str = False, tucker: bool = False):
        super().__init__(base, rank, alpha, rank_dropout=rank_dropout, module_dropout=module_dropout, dora=dora)
        out, inn, *k = self.weight_shape
        self.tucker = bool(tucker and k and tuple(k) != (1, 1))
        fk = {"device": base_device(base), "dtype": torch.float32}
        r = self.rank
        if self.tucker:
            pairs = {"a": (r, out), "b": (r, inn)}
        else:
            pairs = {"a": (out, r), "b": (r, inn * math.prod(k))}
        for i in (1, 2):
            for side, shape in pairs.items():
                setattr(self, f"hada_w{i}_{side}", nn.Parameter(torch.empty(shape, **fk)))
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *k, **fk))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *k, **fk))
        self._finish_init(base)

    def init_weights(self) -> None:
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] + (["hada_t1", "hada_t2"] if self.tucker else [])
        return {n: getattr(self, n) for n in names}

    def _raw_delta(self) -> torch.Tensor:
        t1, t2 = (self.hada_t1, self.hada_t2) if self.tucker else (None, None)
        d = loha_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, t1, t2)
        return d.reshape(self.weight_shape)

    def delta_weight(self) -> torch.Tensor:
        return self._raw_delta() * self.scale

    def update(self, x: torch.Tensor, use_multiplier: bool = True) -> tuple[torch.Tensor, float]:
        return self._finish_update(x, self._raw_delta(), use_multiplier)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tucker={self.tucker}"


# ------------------------------------------------------------------------------------------------
# LoKr
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoKrLayout:
    """Which LoKr tensors a module has and their sizes."""

    out_split: tuple[int, int]
    """(a, b): out = a * b; w1 has a rows, w2 has b."""
    in_split: tuple[int, int]
    """(c, d): in = c * d; w1 has c columns, w2 has d (times the kernel)."""
    w1_rank: int | None
    """None = full w1 (a, c), else w1_a (a, r1) @ w1_b (r1, c)."""
    w2_rank: int | None
    """None = full w2 (b, d[, kh, kw]), else low rank (w2_a, w2_b[, t2])."""
    tucker: bool = False
    """Low-rank w2 with a Tucker core t2 (r2, r2, kh, kw) (convs with a kernel other than 1x1)."""

    @classmethod
    def choose(cls, weight_shape: tuple[int, ...], rank: int, factor: int = -1, decompose_both: bool = False,
               tucker: bool = False) -> LoKrLayout:
        """LyCORIS's choice for a base weight of `weight_shape` and the given options."""
        out, inn, *k = weight_shape
        a, b = factorization(out, factor)
        c, d = factorization(inn, factor)
        w1_rank = rank if decompose_both and rank < max(a, c) / 2 else None
        w2_rank = None if rank >= max(b, d) / 2 else rank
        tucker = bool(tucker and w2_rank is not None and k and tuple(k) != (1, 1))
        return cls((a, b), (c, d), w1_rank, w2_rank, tucker)


class LoKrAdapter(_WeightAdapter):
    """LyCORIS LoKr on one Linear / Conv2d (see the module docstring for shapes, scale and init).

    `rank` is the rank of the low-rank factor(s); with both factors full the scale is 1 and a new
    adapter writes alpha = rank. `layout` (from a file) overrides the choice from factor /
    decompose_both / tucker.
    """

    algo = "lokr"

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, *, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, dora: bool | str = False, factor: int = -1,
                 decompose_both: bool = False, tucker: bool = False, layout: LoKrLayout | None = None):
        if layout is None:
            layout = LoKrLayout.choose(weight_shape(base), rank, factor, decompose_both, tucker)
            if layout.w1_rank is None and layout.w2_rank is None:
                alpha = rank  # LyCORIS writes alpha = rank when both factors are full (scale 1 anyway)
        # ComfyUI divides alpha by the rank of the low-rank factor, w2's when both are
        rank = layout.w2_rank or layout.w1_rank or rank
        super().__init__(base, rank, alpha, rank_dropout=rank_dropout, module_dropout=module_dropout, dora=dora)
        out, inn, *k = self.weight_shape
        (a, b), (c, d) = layout.out_split, layout.in_split
        if a * b != out or c * d != inn:
            raise ValueError(f"LoKr layout {layout} does not fit a weight of shape {self.weight_shape}")
        self.layout = layout
        fk = {"device": base_device(base), "dtype": torch.float32}
        empty = lambda *shape: nn.Parameter(torch.empty(shape, **fk))
        if layout.w1_rank is None:
            self.lokr_w1 = empty(a, c)
        else:
            self.lokr_w1_a, self.lokr_w1_b = empty(a, layout.w1_rank), empty(layout.w1_rank, c)
        r2 = layout.w2_rank
        if r2 is None:
            self.lokr_w2 = empty(b, d, *k)
        elif layout.tucker:
            self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b = empty(r2, r2, *k), empty(r2, b), empty(r2, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = empty(b, r2), empty(r2, d * math.prod(k))
        self._finish_init(base)

    @property
    def tucker(self) -> bool:
        return self.layout.tucker

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 when both factors are full (ComfyUI ignores alpha then)."""
        if self.layout.w1_rank is None and self.layout.w2_rank is None:
            return 1.0
        return self.alpha / self.rank

    def init_weights(self) -> None:
        kaiming = lambda p: nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        for name, p in self.file_tensors().items():
            if name in ("lokr_w2", "lokr_w2_b"):
                nn.init.zeros_(p)
            else:
                kaiming(p)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        return {n: self._parameters[n] for n in names if n in self._parameters}

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1 (a, c), w2 (b, d*k) or (b, d, kh, kw)), low-rank factors multiplied out."""
        p = self._parameters
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif self.layout.tucker:
            w2 = tucker_rebuild(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        return w1, w2

    def _raw_delta(self) -> torch.Tensor:
        return kron_delta(*self.factors()).reshape(self.weight_shape)

    def delta_weight(self) -> torch.Tensor:
        return self._raw_delta() * self.scale

    def update(self, x: torch.Tensor, use_multiplier: bool = True) -> tuple[torch.Tensor, float]:
        return self._finish_update(x, self._raw_delta(), use_multiplier)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layout={self.layout}"


# ------------------------------------------------------------------------------------------------
# Full-weight difference (import only)
# ------------------------------------------------------------------------------------------------
class FullAdapter(_WeightAdapter):
    """A stored full-size update: `diff` like the base weight, optional `diff_b` (out,) for its bias.
    ComfyUI adds strength * diff (and strength * diff_b); no alpha."""

    algo = "full"
    has_alpha = False

    def __init__(self, base: nn.Linear | nn.Conv2d, *, bias: bool = False, **dropouts):
        super().__init__(base, 1, 1.0, **dropouts)
        if bias and base.bias is None:
            raise ValueError("diff_b given for a layer without a bias")
        fk = {"device": base_device(base), "dtype": torch.float32}
        self.diff = nn.Parameter(torch.empty(self.weight_shape, **fk))
        self.diff_b = nn.Parameter(torch.empty(self.weight_shape[0], **fk)) if bias else None
        self._finish_init(base)

    def init_weights(self) -> None:
        nn.init.zeros_(self.diff)
        if self.diff_b is not None:
            nn.init.zeros_(self.diff_b)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"diff": self.diff} | ({} if self.diff_b is None else {"diff_b": self.diff_b})

    def delta_weight(self) -> torch.Tensor:
        return self.diff * self.scale

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b * self.scale

    def update(self, x: torch.Tensor, use_multiplier: bool = True) -> tuple[torch.Tensor, float]:
        return self._finish_update(x, self.diff, use_multiplier, self.diff_b)
