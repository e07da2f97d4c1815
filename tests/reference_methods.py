"""Plain whole-tensor float64 reference implementations of every method, from methods.md.

Deliberately naive (whole tensors, sorts, no streaming): they are the yardstick the
streaming engine is compared with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moemerge.methods.running import RunningStep

#: Elements whose sign election is a tie within float32 rounding (|sum D_i| <= 2^-20 sum |D_i|):
#: there float32 and float64 may elect different signs, both correct. Set by the consensus
#: references, read (and bounded) by the tests.
AMBIGUOUS: dict[str, torch.Tensor] = {}

Ref = Callable[[torch.Tensor | None, list[torch.Tensor], list[dict], dict], torch.Tensor]


def _avg_weights(kind: str, n: int, alpha: float) -> list[float]:
    if kind == "sma":
        return [1 / n] * n
    if kind == "wma":
        return [(i + 1) / (n * (n + 1) / 2) for i in range(n)]
    if kind == "minus-sqrt":  # Megatron-LM: c_j = f(j/N) - f((j+1)/N), f(x) = 1 - sqrt(x), oldest first
        return [((j + 1) / n) ** 0.5 - (j / n) ** 0.5 for j in range(n)]
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]


def linear(base, xs, per, glob, name=""):
    w = [p["weight"] for p in per]
    out = sum(wi * x for wi, x in zip(w, xs))
    return out / sum(w) if glob.get("normalize", True) else out


def task_arithmetic(base, xs, per, glob, name=""):
    w = [p["weight"] for p in per]
    mixed = sum(wi * (x - base) for wi, x in zip(w, xs))
    if glob.get("normalize", False) and abs(sum(w)) >= 1e-8:
        mixed = mixed / sum(w)
    return base + glob.get("lambda", 1.0) * mixed


def passthrough(base, xs, per, glob, name=""):
    return xs[0] * per[0].get("scale", 1.0)


def _average(kind: str) -> Ref:
    def ref(base, xs, per, glob, name=""):
        w = _avg_weights(kind, len(xs), glob.get("alpha", 0.2))
        return sum(wi * x for wi, x in zip(w, xs))

    return ref


REFERENCES: dict[str, Ref] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "passthrough": passthrough,
    "sma": _average("sma"),
    "wma": _average("wma"),
    "ema": _average("ema"),
    "minus-sqrt": _average("minus-sqrt"),
}


def fp32_bound(base, xs, per, glob, method: str) -> torch.Tensor:
    """Rounding bound of fp32 accumulation: about n * 2^-24 * sum |w_i x_i| (+ base terms)."""
    n = len(xs) + 2
    if method in ("sma", "wma", "ema", "minus-sqrt"):
        w = _avg_weights(method, len(xs), glob.get("alpha", 0.2))
    else:
        w = [p.get("weight", p.get("scale", 1.0)) for p in per]
        if method == "linear" and glob.get("normalize", True):
            w = [x / sum(w) for x in w]
    mag = sum(abs(wi) * x.abs() for wi, x in zip(w, xs))
    if base is not None:
        lam = abs(glob.get("lambda", 1.0))
        mag = lam * (mag + sum(abs(wi) for wi in w) * base.abs()) + base.abs()
    return 4 * n * 2.0**-24 * mag


# -- the generalized task-arithmetic family -------------------------------------------------

FAMILY = {  # name -> (sparsify, consensus, normalize default, rescale default)
    "task_arithmetic": ("none", False, False, None),
    "ties": ("magnitude", True, True, None),
    "dare_linear": ("random", False, False, True),
    "dare_ties": ("random", True, False, True),
    "breadcrumbs": ("outliers", False, False, None),
    "breadcrumbs_ties": ("outliers", True, False, None),
    "della_linear": ("magprune", False, False, True),
    "della": ("magprune", True, True, True),
}


def _desc_order(d: torch.Tensor) -> torch.Tensor:
    """Flat indices by |d| descending, ties by lowest index first (a full stable sort)."""
    return torch.argsort(-d.abs().reshape(-1), stable=True)


def _rank_window(d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    mask[_desc_order(d)[lo:hi]] = True
    return mask.reshape(d.shape)


def _uniform(name: str, i: int, n: int, seed: int = 0) -> torch.Tensor:
    from moemerge.methods.stats import stream_key, uniform

    return uniform(stream_key(seed, name, i), 0, n)


def _magprune_probs(d: torch.Tensor, p: float, e: float) -> torch.Tensor:
    a = d.abs()
    if a.dim() == 1:
        a = a.unsqueeze(0)
    dim = 1
    m = a.shape[dim]
    ranks = torch.argsort(torch.argsort(a, dim=dim, stable=True), dim=dim, stable=True).double()
    r = ranks / (m - 1) if m > 1 else torch.full(a.shape, 0.5, dtype=torch.float64)
    return ((p - e) + 2 * e * r).reshape(d.shape)


def _sparsify(kind: str, d: torch.Tensor, per: dict, glob: dict, name: str, i: int, rescale: bool) -> torch.Tensor:
    p = per.get("density", 1.0)
    if kind == "none" or p >= 1:
        return d
    n = d.numel()
    if kind == "magnitude":
        k = 0 if p <= 0 else max(1, int(p * n))
        return d * _rank_window(d, 0, k)
    if kind == "outliers":
        keep = int(p * n)
        top = int(per.get("gamma", 0.01) * n)
        bottom = max(0, n - keep - top)
        return d * _rank_window(d, n - bottom - keep, n - bottom)
    u = _uniform(name, i, n).reshape(d.shape)
    if kind == "random":
        mask = u < p
    else:
        mask = u < _magprune_probs(d, p, per.get("epsilon", 0.15)) if p > 0 else torch.zeros_like(d, dtype=torch.bool)
    kept = d * mask
    if rescale:
        full, part = d.abs().sum().item(), kept.abs().sum().item()
        if full >= 1e-7 and part >= 1e-7:
            kept = kept * (full / part)
    return kept


def _generalized(method: str) -> Ref:
    kind, consensus, norm_default, rescale_default = FAMILY[method]

    def ref(base, xs, per, glob, name=""):
        w = [pp["weight"] for pp in per]
        rescale = glob.get("rescale", rescale_default)
        ds = [wi * _sparsify(kind, x - base, pp, glob, name, i, bool(rescale))
              for i, (wi, x, pp) in enumerate(zip(w, xs, per))]
        stacked = torch.stack(ds)
        if consensus:
            AMBIGUOUS["last"] = (stacked.sum(0).abs() <= 2.0**-20 * stacked.abs().sum(0)) & (stacked.abs().sum(0) > 0)
            sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
            mask = torch.sign(stacked) == sign
            mixed = (stacked * mask).sum(0)
            wt = torch.tensor(w, dtype=torch.float64).reshape(-1, *([1] * base.dim()))
            div = (wt * mask).sum(0)
            div[div == 0] = 1
        else:
            mixed = stacked.sum(0)
            div = sum(w) if abs(sum(w)) >= 1e-8 else 1.0
        if glob.get("normalize", norm_default):
            mixed = mixed / div
        return base + glob.get("lambda", 1.0) * mixed

    return ref


# -- geometric methods and sce ----------------------------------------------------------------

def slerp(base, xs, per, glob, name=""):
    import math

    v0, v1, t = base, xs[0], glob["t"]
    n0 = v0.norm().item() or 1.0
    n1 = v1.norm().item() or 1.0
    n0 = n0 if n0 >= 1e-8 else 1.0
    n1 = n1 if n1 >= 1e-8 else 1.0
    c = max(-1.0, min(1.0, (v0 * v1).sum().item() / (n0 * n1)))
    if abs(c) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = math.acos(c)
    return (math.sin((1 - t) * th) * v0 + math.sin(t * th) * v1) / math.sin(th)


def nearswap(base, xs, per, glob, name=""):
    a = (glob["t"] / (base - xs[0]).abs().clamp_min(1e-6)).clamp(0, 1)
    return a * xs[0] + (1 - a) * base


def nuslerp(base, xs, per, glob, name=""):
    w1, w2 = per[0]["weight"], per[1]["weight"]
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    v0, v1 = (xs[0] - base, xs[1] - base) if base is not None else (xs[0], xs[1])
    shape = v0.shape
    if glob.get("nuslerp_flatten", True):
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif glob.get("nuslerp_row_wise", False):
        a, b = v0.reshape(shape[0], -1).T, v1.reshape(shape[0], -1).T
    else:
        a, b = v0.reshape(-1, shape[-1]), v1.reshape(-1, shape[-1])
    ua = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    c = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    th = torch.acos(c)
    s = torch.sin(th)
    slerped = (torch.sin((1 - t) * th) * a + torch.sin(t * th) * b) / torch.where(s == 0, 1.0, s)
    out = torch.where(1 - c * c <= 1e-16, (1 - t) * a + t * b, slerped)
    if glob.get("nuslerp_row_wise", False) and not glob.get("nuslerp_flatten", True):
        out = out.T
    out = out.reshape(shape)
    return out + base if base is not None else out


def model_stock(base, xs, per, glob, name=""):
    offs = [x - base for x in xs]
    n = len(xs)
    if glob.get("filter_wise", False):
        offs = [o.unsqueeze(0) if o.dim() == 1 else o for o in offs]
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                num = (offs[i] * offs[j]).sum(-1)
                den = (offs[i].norm(dim=-1) * offs[j].norm(dim=-1)).clamp_min(1e-6)
                cos.append((num / den).clamp(-1, 1))
        c = torch.stack(cos).mean(0).unsqueeze(-1)
        if base.dim() == 1:
            c = c.squeeze(0)
    else:
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                den = max(offs[i].norm().item() * offs[j].norm().item(), 1e-6)
                cos.append(max(-1.0, min(1.0, (offs[i] * offs[j]).sum().item() / den)))
        c = torch.tensor(sum(cos) / len(cos), dtype=torch.float64)
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-6, 0.0, n * c / den)
    return t * (sum(xs) / n) + (1 - t) * base


def sce(base, xs, per, glob, name=""):
    ds = torch.stack([x - base for x in xs])
    topk = glob.get("select_topk", 1.0)
    if topk < 1:
        # the variance as methods.md / sce.variance_into define it: float32 task vectors widened,
        # S1 and S2 summed in input order, max(n S2 - S1^2, 0) / n^2 rounded once to float32
        n = len(xs)
        d32 = [(x.float() - base.float()).double() for x in xs]
        s1, s2 = d32[0].clone(), d32[0] * d32[0]
        for d in d32[1:]:
            s1, s2 = s1 + d, s2 + d * d
        var = ((n * s2 - s1 * s1).clamp(min=0.0) / (n * n)).float()
        k = int(topk * int(torch.count_nonzero(var)))
        mask = _rank_window(var, 0, k) if k > 0 else torch.zeros_like(var, dtype=torch.bool)
        ds = ds * mask
    energy = (ds**2).reshape(len(xs), -1).mean(1)
    total = energy.sum().item()
    eta = torch.full_like(energy, 1 / len(xs)) if abs(total) < 1e-6 else energy / total
    AMBIGUOUS["last"] = (ds.sum(0).abs() <= 2.0**-20 * ds.abs().sum(0)) & (ds.abs().sum(0) > 0)
    sign = torch.where(ds.sum(0) >= 0, 1.0, -1.0).double()
    erase = torch.sign(ds) == sign
    w = eta.reshape(-1, *([1] * base.dim())) * erase
    return base + (ds * w).sum(0) / w.sum(0).clamp_min(1e-6)


for _m in FAMILY:
    REFERENCES[_m] = _generalized(_m)
REFERENCES.update(slerp=slerp, nearswap=nearswap, nuslerp=nuslerp, model_stock=model_stock, sce=sce)


def stat_bound(base, xs, per, glob) -> torch.Tensor:
    """A generous fp32-accumulation bound for methods with statistics: 2^-16 of the magnitudes.

    Stated per the issue: statistics are exact, but the apply step computes in float32 and
    rescale factors / divisors can amplify rounding of task vectors; 2^-16 relative to the
    inputs' magnitude (about 256 float32 ulps) covers that and is far below any mask error.
    """
    mag = sum(x.abs() for x in xs) + (base.abs() if base is not None else 0)
    scale = max([1.0, abs(glob.get("lambda", 1.0))] + [abs(p.get("weight", 1.0)) for p in per])
    return 2.0**-16 * mag * scale * len(xs)


def multislerp(base, xs, per, glob, name=""):
    """MergeKit 0.1.5's multislerp, whole tensors in float64."""
    if len(xs) == 1:
        return xs[0]
    eps = glob.get("eps", 1e-8)
    t = torch.stack(xs)
    if base is not None:
        t = t - base
    flat = t.reshape(len(xs), -1)
    w = torch.tensor([p["weight"] for p in per], dtype=torch.float64)
    if glob.get("normalize_weights", True):
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tn = tangent.norm() + eps
    res = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    res = res.reshape(xs[0].shape)
    return res + base if base is not None else res


def karcher(base, xs, per, glob, name=""):
    """MergeKit 0.1.5's Karcher mean (equal weights), whole tensors in float64."""
    import math

    max_iter, tol = glob.get("max_iter", 10), glob.get("tol", 1e-5)
    n = len(xs)
    if n == 1:
        return xs[0]
    alphas = [1 / n] * n
    norms = [x.norm().item() for x in xs]
    units = [x / nm if nm else torch.zeros_like(x) for x, nm in zip(xs, norms)]
    valid = [i for i in range(n) if norms[i] > tol]
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i].reshape(-1) for i in valid]
    mean = sum(ai * u for ai, u in zip(a, us))
    mean = us[0].clone() if mean.norm().item() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, us):
            dot = max(-1.0, min(1.0, torch.dot(mean, u).item()))
            th = math.acos(dot)
            if th < tol:
                continue
            tangent += ai * (th / math.sin(th)) * (u - dot * mean)
        tnorm = tangent.norm().item()
        if tnorm < tol:
            break
        mean = math.cos(tnorm) * mean + math.sin(tnorm) * (tangent / tnorm)
        if mean.norm().item() > tol:
            mean = mean / mean.norm()
    return (sum(al * nm for al, nm in zip(alphas, norms)) * mean).reshape(xs[0].shape)


REFERENCES.update(multislerp=multislerp, karcher=karcher)


# -- arcee_fusion, ram, ramplus_tl (MergeKit 0.1.5: merge_methods/arcee_fusion.py, ram.py) --------

def arcee_fusion(base, xs, per, glob, name=""):
    """MergeKit's arcee_fusion in float64 on whole tensors (every element, no 1M-element sample).

    Sets AMBIGUOUS["last"] to the elements whose importance is within 1e-5 (relative) of the
    threshold: there float32 and float64 rounding may decide the mask either way.
    """
    x = xs[0]
    vec = x.reshape(1, -1) if x.dim() <= 1 else x  # softmax along the last dim; a 1-D tensor is one vector
    bv = base.reshape(1, -1) if base.dim() <= 1 else base
    p = torch.softmax(vec, dim=-1) + 1e-8
    q = torch.softmax(bv, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True).clamp_min(0.0)  # KL >= 0: only rounding is below
    imp = ((vec - bv).abs() * kl).reshape(x.shape)
    srt = imp.reshape(-1).sort().values
    n = srt.numel()
    q1, med, q3 = (srt[int(f * (n - 1))].item() for f in (0.25, 0.5, 0.75))
    thr = med + 1.5 * (q3 - q1)
    # (a zero threshold is exact: then kl or |d| is exactly 0 wherever importance is)
    AMBIGUOUS["last"] = ((imp - thr).abs() <= 1e-5 * abs(thr)) & (thr != 0)
    return base + (x - base) * (imp >= thr)


def _ram_masks(base, xs, eps):
    tv = torch.stack([x - base for x in xs]).reshape(len(xs), -1)
    moved = tv.abs() > eps
    c = moved.sum(0, keepdim=True)
    return tv * moved, moved, c


def ram(base, xs, per, glob, name=""):
    """b + per element: the one moved task-vector value, or the mean of the moved ones (|d| > eps)."""
    tv, _, c = _ram_masks(base, xs, glob.get("epsilon", 1e-5))
    merged = (tv * (c == 1) + tv * (c > 1) / c.clamp(min=1)).sum(0)
    return base + merged.reshape(base.shape)


def ramplus_tl(base, xs, per, glob, name=""):
    """ram, with a value only model i moved scaled by 1 + r clamp(shared_i / max(unique_i, eps), 0, alpha)."""
    eps = glob.get("epsilon", 1e-5)
    tv, moved, c = _ram_masks(base, xs, eps)
    shared = (moved & (c > 1)).sum(1).double()
    unique = (moved & (c == 1)).sum(1).double()
    rho = shared / unique.clamp(min=eps)
    lam = 1 + glob.get("r", 0.1) * rho.clamp(min=0, max=glob.get("alpha", 0.2))
    merged = (tv * (c == 1) * lam.unsqueeze(-1) + tv * (c > 1) / c.clamp(min=1)).sum(0)
    return base + merged.reshape(base.shape)


REFERENCES.update(arcee_fusion=arcee_fusion, ram=ram, ramplus_tl=ramplus_tl)


def running_fold(step: RunningStep, snaps: list[torch.Tensor], sums_in: dict[str, torch.Tensor],
                 block: int = 4096, out_dtype: torch.dtype = torch.float64
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`pma update`'s torch running-sum step over whole vectors, `block` elements at a time as
    engine/running.py runs it: the sums it writes (sums not written keep the fill 7.0) and the
    average in `out_dtype`."""
    from moemerge.methods.running import SCRATCH

    numel = snaps[0].numel() if snaps else next(iter(sums_in.values())).numel()
    out = {q: torch.full((numel,), 7.0, dtype=torch.float64) for q in step.quantities} if step.writes_sums else {}
    avg = torch.empty(numel, dtype=out_dtype)
    scratch = [torch.empty(block, dtype=torch.float64) for _ in range(SCRATCH)]
    for s in range(0, numel, block):
        e = min(numel, s + block)
        sc = [x[:e - s] for x in scratch]
        sums = step.fold([x[s:e] for x in snaps], {q: v[s:e] for q, v in sums_in.items()},
                         {q: v[s:e] for q, v in out.items()}, sc)
        avg[s:e].copy_(step.average(sums, sc[0]))
    return out, avg
