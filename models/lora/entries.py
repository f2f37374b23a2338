"""One module's tensors in a LoRA file: which algorithm they form, whether they fit a layer, the
adapter target they describe and the update they encode.

A file names each tensor `<module>.<suffix>`; the suffixes of one module say its kind:

    lora   lora_down.weight, lora_up.weight [, lora_mid.weight (LyCORIS LoCon Tucker core)]
           (PEFT lora_A.weight / lora_B.weight are read as down / up)
    loha   hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b [, hada_t1, hada_t2]
    lokr   lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b [, lokr_t2]
    full   diff [, diff_b]
    any    alpha (0-dim), dora_scale (DoRA magnitude; not with `full`)

The updates follow ComfyUI's reading of these files (`comfy/weight_adapter`): LoRA and LoHa
scale by alpha / rank (rank = rows of lora_down / hada_w1_b, alpha absent = scale 1), LoKr by
alpha / (rank of its low-rank factor, w2's first) or 1 when both factors are full, full
differences are not scaled.
"""
from __future__ import annotations

import math
import re

import torch

from .lycoris import LoKrLayout, kron_delta, loha_delta, tucker_rebuild

__all__ = ["KIND_SUFFIXES", "SUFFIX_PATTERN", "LoRAModuleWeights", "ModuleMismatch"]

KIND_SUFFIXES = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff", "diff_b"),
}
"""Key suffixes of each adapter kind."""
SUFFIX_PATTERN = "|".join(re.escape(s) for names in (*KIND_SUFFIXES.values(), ("alpha", "dora_scale")) for s in names)
"""Regex alternation of every known suffix (for `<module>.<suffix>` keys)."""


class ModuleMismatch(ValueError):
    """The tensors of a module do not fit the layer it names (message: what and what is needed)."""


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


class LoRAModuleWeights(dict):
    """Tensors of one module in a file by key suffix (`lora_down.weight`, `hada_w1_a`, ...);
    `alpha` is a float."""

    # -- what it is -------------------------------------------------------------------------------
    @property
    def algo(self) -> str | None:
        """`lora`, `loha`, `lokr` or `full`; None when the tensors form no complete adapter."""
        return None if self.problem() else self._kinds()[0]

    def _kinds(self) -> list[str]:
        return [k for k, names in KIND_SUFFIXES.items() if any(n in self for n in names)]

    def problem(self) -> str | None:
        """Why these tensors are not one complete adapter, or None."""
        kinds = self._kinds()
        if not kinds:
            return "only " + ", ".join(sorted(self)) + ", no adapter weights"
        if len(kinds) > 1:
            return "mixes " + " and ".join(kinds) + " tensors"
        kind, has = kinds[0], lambda *names: all(n in self for n in names)
        need: list[str] = []
        if kind == "lora":
            need = [n for n in ("lora_down.weight", "lora_up.weight") if n not in self]
        elif kind == "loha":
            need = [n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if n not in self]
            if has("hada_t1") != has("hada_t2"):
                need.append("hada_t2" if has("hada_t1") else "hada_t1")
        elif kind == "lokr":
            for i in (1, 2):
                full, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
                if full in self and (a in self or b in self):
                    return f"has both {full} and {a}/{b}"
                if full not in self:
                    need += [n for n in (a, b) if n not in self] if (a in self or b in self) else [f"{full} or {a}+{b}"]
            if "lokr_t2" in self and "lokr_w2" in self:
                return "has lokr_t2 with a full lokr_w2"
        elif "diff" not in self:
            need = ["diff"]
        if need:
            return f"incomplete {kind} adapter: missing " + ", ".join(need)
        if kind == "full" and "dora_scale" in self:
            return "dora_scale with a full difference"
        return None

    @property
    def tucker(self) -> bool:
        return any(n in self for n in ("lora_mid.weight", "hada_t1", "lokr_t2"))

    def label(self) -> str:
        """The kind for listings: `lora`, `loha`, `lokr`, `full`, `+tucker` / `+dora` when so."""
        kind = self.algo or "incomplete"
        return kind + ("+tucker" if self.tucker else "") + ("+dora" if "dora_scale" in self else "")

    @property
    def rank(self) -> int | None:
        """The rank the file's alpha divides (ComfyUI's reading); None for full updates and LoKr
        with both factors full."""
        if "lora_down.weight" in self:
            return self["lora_down.weight"].shape[0]
        if "hada_w1_b" in self:
            return self["hada_w1_b"].shape[0]
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in self:
                return self[key].shape[0]
        return None

    @property
    def scale(self) -> float:
        """The factor ComfyUI applies to the update."""
        rank = self.rank
        alpha = self.get("alpha")
        return 1.0 if rank is None or alpha is None else alpha / rank

    @property
    def in_width(self) -> int:
        """Input features of a Linear module (times the kernel size for flattened conv factors)."""
        if "lora_down.weight" in self:
            return self["lora_down.weight"].shape[1]
        if "hada_w1_b" in self:
            return self["hada_w1_b"].shape[1]
        if "diff" in self:
            return self["diff"].shape[1]
        c = self["lokr_w1"].shape[1] if "lokr_w1" in self else self["lokr_w1_b"].shape[1]
        d = self["lokr_w2"].shape[1] if "lokr_w2" in self else self["lokr_w2_b"].shape[1]
        return c * d

    def visible_kernel(self) -> tuple[int, ...] | None:
        """The conv kernel the tensors show (4-D factors), None when they do not show one."""
        for key in ("lora_mid.weight", "lora_down.weight", "hada_t1", "lokr_t2", "lokr_w2", "diff"):
            if key in self and self[key].dim() == 4:
                return tuple(self[key].shape[2:])
        return None

    # -- against a layer --------------------------------------------------------------------------
    def target_fields(self, weight_shape: tuple[int, ...], has_bias: bool) -> dict:
        """`LoRATarget` fields (rank, alpha, dora, algo, tucker, layout, bias) of this module on a
        layer with weight `weight_shape`; raises ModuleMismatch naming the misfit."""
        out, inn, *k = weight_shape
        kernel = tuple(k)
        fields = {"dora": self._dora_axis(out, inn), "algo": self.algo}
        if self.algo == "lora":
            fields |= self._lora_fields(out, inn, kernel)
        elif self.algo == "loha":
            fields |= self._loha_fields(out, inn, kernel)
        elif self.algo == "lokr":
            fields |= self._lokr_fields(out, inn, kernel)
        else:
            if math.prod(self["diff"].shape) != math.prod(weight_shape) or self["diff"].shape[0] != out:
                raise ModuleMismatch(f"diff {_shape(self['diff'])}, the layer weight is {list(weight_shape)}")
            db = self.get("diff_b")
            if db is not None and (not has_bias or db.numel() != out):
                raise ModuleMismatch(f"diff_b {_shape(db)}, the layer has " + (f"a bias of {out}" if has_bias else "no bias"))
            fields |= {"rank": 1, "alpha": 1.0, "bias": db is not None}
        return fields

    def _dora_axis(self, out: int, inn: int) -> str | bool:
        dora = self.get("dora_scale")
        if dora is None:
            return False
        if dora.shape[0] == out and dora.numel() == out:  # ComfyUI's rule: rows first
            return "out"
        if dora.numel() == inn:
            return "in"
        raise ModuleMismatch(f"dora_scale {_shape(dora)} fits neither {out} outputs nor {inn} inputs")

    def _alpha(self, rank: int) -> float:
        return float(self.get("alpha", rank))

    def _lora_fields(self, out, inn, kernel) -> dict:
        down, up, mid = self["lora_down.weight"], self["lora_up.weight"], self.get("lora_mid.weight")
        r = down.shape[0]
        ones = (1,) * len(kernel)
        if mid is not None:
            if not kernel or kernel == (1, 1):
                raise ModuleMismatch(f"lora_mid {_shape(mid)} on a layer without a spatial kernel")
            want = {"lora_down.weight": (r, inn, *ones), "lora_mid.weight": (r, r, *kernel),
                    "lora_up.weight": (out, r, *ones)}
        else:
            want = {"lora_down.weight": (r, inn, *kernel), "lora_up.weight": (out, r, *ones)}
        for key, shape in want.items():
            t = self[key]
            squeezed = key != "lora_mid.weight" and t.dim() == 2 and shape[2:] == ones  # 2-D factor of a 1x1 conv
            if tuple(t.shape) != shape and not (squeezed and tuple(t.shape) == shape[:2]):
                raise ModuleMismatch(f"shapes down {_shape(down)} up {_shape(up)}"
                                     + (f" mid {_shape(mid)}" if mid is not None else "")
                                     + f", the model needs {[list(s) for s in want.values()]}")
        return {"rank": r, "alpha": self._alpha(r), "tucker": mid is not None}

    def _loha_fields(self, out, inn, kernel) -> dict:
        r = self["hada_w1_b"].shape[0]
        if self.tucker:
            if not kernel or kernel == (1, 1):
                raise ModuleMismatch("hada_t1/hada_t2 (Tucker cores) on a layer without a spatial kernel")
            want = {"hada_w1_a": (r, out), "hada_w1_b": (r, inn), "hada_t1": (r, r, *kernel)}
        else:
            want = {"hada_w1_a": (out, r), "hada_w1_b": (r, inn * math.prod(kernel))}
        want |= {k.replace("1", "2"): v for k, v in want.items()}
        got = {k: tuple(self[k].shape) for k in want}
        if got != want:
            raise ModuleMismatch(f"shapes {', '.join(f'{k} {list(v)}' for k, v in got.items())}, the model needs "
                                 f"{', '.join(f'{k} {list(v)}' for k, v in want.items())}")
        return {"rank": r, "alpha": self._alpha(r), "tucker": self.tucker}

    def _lokr_fields(self, out, inn, kernel) -> dict:
        k = math.prod(kernel)
        g = self.get
        w1, w1a, w1b, w2, w2a, w2b, t2 = (g(n) for n in KIND_SUFFIXES["lokr"])
        listing = ", ".join(f"{n} {_shape(self[n])}" for n in KIND_SUFFIXES["lokr"] if n in self)
        problem = f"LoKr tensors {listing} do not fit a weight of shape {[out, inn, *kernel]}"
        a, c = w1.shape if w1 is not None else (w1a.shape[0], w1b.shape[1])
        r1 = None if w1 is not None else w1a.shape[1]
        if r1 is not None and w1b.shape[0] != r1:
            raise ModuleMismatch(problem)
        r2 = None
        if w2 is not None:
            b = w2.shape[0]
            if w2.dim() == 4 and tuple(w2.shape[2:]) != kernel:
                raise ModuleMismatch(problem)
            d = w2.shape[1] if w2.dim() == 4 else w2.shape[1] // k
        elif t2 is not None:
            r2, b, d = w2a.shape[0], w2a.shape[1], w2b.shape[1]
            if (not kernel or tuple(t2.shape) != (r2, r2, *kernel) or kernel == (1, 1) or w2b.shape[0] != r2):
                raise ModuleMismatch(problem)
        else:
            r2, b = w2a.shape[1], w2a.shape[0]
            d = w2b.shape[1] if w2b.dim() == 4 else w2b.shape[1] // k
            if w2b.shape[0] != r2:
                raise ModuleMismatch(problem)
        layout = LoKrLayout((a, b), (c, d), r1, r2, t2 is not None)
        flat_w2 = self._w2_numel_ok(layout, kernel)
        if a * b != out or c * d != inn or not flat_w2:
            raise ModuleMismatch(problem)
        rank = r2 or r1 or 1
        return {"rank": rank, "alpha": self._alpha(rank), "tucker": t2 is not None, "layout": layout}

    def _w2_numel_ok(self, layout: LoKrLayout, kernel: tuple) -> bool:
        """The w2 tensors hold exactly what the layout needs (flattened kernels included)."""
        (_, b), (_, d) = layout.out_split, layout.in_split
        k = math.prod(kernel)
        if "lokr_w2" in self:
            return self["lokr_w2"].numel() == b * d * k
        if layout.tucker:
            return True
        return self["lokr_w2_b"].numel() == layout.w2_rank * d * k

    # -- the update ---------------------------------------------------------------------------------
    def delta(self, weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight update at strength 1, float32, shaped `weight_shape`; bias update or None), as
        ComfyUI computes it (DoRA magnitudes are not applied: they are carried separately)."""
        f = {k: v.float() for k, v in self.items() if k != "alpha"}
        algo = self.algo
        if algo == "lora":
            down = f["lora_down.weight"]
            if "lora_mid.weight" in f:
                down = torch.einsum("abhw,bi->aihw", f["lora_mid.weight"], down.flatten(1))
            d = f["lora_up.weight"].flatten(1) @ down.flatten(1)
        elif algo == "loha":
            d = loha_delta(*(f.get(n) for n in KIND_SUFFIXES["loha"]))
        elif algo == "lokr":
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            if "lokr_w2" in f:
                w2 = f["lokr_w2"]
            elif "lokr_t2" in f:
                w2 = tucker_rebuild(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
            else:
                w2 = f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1)
            d = kron_delta(w1, w2)
        else:
            return f["diff"].reshape(weight_shape), f.get("diff_b")
        return d.reshape(weight_shape) * self.scale, None
