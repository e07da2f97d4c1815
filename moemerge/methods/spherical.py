"""multislerp and karcher: spherical means of several tensors, as MergeKit 0.1.5 defines them.

Both results are linear combinations of the (flattened) inputs, and every quantity their
algorithms use (norms, dots with the running mean, tangent norms) is a function of the Gram
matrix G_ij = <x_i, x_j>. So one streaming pass computes G exactly, the algorithm runs on
coefficient vectors in float64, and the apply step is a weighted sum: constant memory for any
tensor size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.errors import MergeRuntimeError
from moemerge.methods._kernels import weighted_delta_sum, weighted_sum
from moemerge.methods._vectors import exact_dots, reduce_dots
from moemerge.methods.base import Chunk, Method, ParamSpec, StatPass, TensorParams, check_range

__all__ = ["MULTISLERP", "KARCHER", "multislerp_coefficients", "karcher_coefficients"]


def _vectors(chunk: Chunk) -> list[torch.Tensor]:
    """Inputs (task vectors when there is a base), each in its own scratch buffer."""
    base = chunk.base(out=chunk.scratch(0)) if chunk.has_base else None
    out = []
    for i in range(chunk.n_inputs):
        v = chunk.input(i, out=chunk.scratch(2 + i))
        if base is not None:
            v.sub_(base)
        out.append(v)
    return out


def _gram_pass() -> StatPass:
    def map_(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> list[int]:
        vs = _vectors(chunk)
        n = len(vs)
        return exact_dots([(vs[i], vs[j]) for i in range(n) for j in range(i, n)])

    def reduce(parts: Sequence[list[int]]) -> np.ndarray:
        flat = reduce_dots(parts)
        n = int((math.isqrt(8 * len(flat) + 1) - 1) // 2)
        g = np.zeros((n, n))
        k = 0
        for i in range(n):
            for j in range(i, n):
                g[i, j] = g[j, i] = flat[k]
                k += 1
        return g

    return StatPass(name="gram", map=map_, reduce=reduce)


def _norm(c: np.ndarray, g: np.ndarray) -> float:
    return math.sqrt(max(float(c @ g @ c), 0.0))


def multislerp_coefficients(g: np.ndarray, w: list[float], normalize: bool, eps: float, name: str) -> np.ndarray:
    """c with result = sum_i c_i x_i, following MergeKit 0.1.5's multislerp step by step."""
    w_ = np.array(w, dtype=np.float64)
    if normalize:
        w_ = w_ / w_.sum()
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    a = w_ / (norms + eps)  # sum w_i u_i, u_i = x_i / (|x_i| + eps)
    mean_norm = _norm(a, g)
    if mean_norm < eps:
        if len(w) == 2:
            return w_  # MergeKit's fallback: linear interpolation
        raise MergeRuntimeError(
            f"tensor `{name}`: multislerp's weighted mean of the inputs is zero (antipodal inputs "
            "with balancing weights); use different weights"
        )
    mu = a / mean_norm  # the mean direction
    dots = (g @ mu) / (norms + eps)  # <u_i, mean>
    tau = a - float(w_ @ dots) * mu  # sum w_i (u_i - dot_i mean)
    tn = _norm(tau, g) + eps
    res = mu * math.cos(tn) + tau * (math.sin(tn) / tn)
    return res * float(norms @ w_)


def karcher_coefficients(g: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """c with result = sum_i c_i x_i: MergeKit 0.1.5's weighted Karcher mean, equal weights."""
    n = g.shape[0]
    alphas = [1.0 / n] * n
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return np.zeros(n)
    # unit vectors u_i = x_i / |x_i|: their Gram matrix
    inv = np.array([1.0 / norms[i] if norms[i] > 0 else 0.0 for i in range(n)])
    gu = g * np.outer(inv, inv)
    total = sum(alphas[i] for i in valid)
    alpha = {i: alphas[i] / total for i in valid}
    mean = np.zeros(n)  # coefficients over the unit vectors
    for i in valid:
        mean[i] += alpha[i]
    mn = _norm(mean, gu)
    if mn < tol:
        mean = np.zeros(n)
        mean[valid[0]] = 1.0
    else:
        mean = mean / mn
    for _ in range(max_iter):
        tangent = np.zeros(n)
        for i in valid:
            dot = min(1.0, max(-1.0, float(gu[i] @ mean)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            f = alpha[i] * theta / math.sin(theta)
            tangent[i] += f
            tangent -= f * dot * mean
        tnorm = _norm(tangent, gu)
        if tnorm < tol:
            break
        mean = math.cos(tnorm) * mean + math.sin(tnorm) * (tangent / tnorm)
        un = _norm(mean, gu)
        if un > tol:
            mean = mean / un
    scale = sum(a * nrm for a, nrm in zip(alphas, norms))
    back: np.ndarray = scale * mean * inv  # back from unit vectors to the inputs
    return back


def _multislerp_apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    if chunk.n_inputs == 1:  # MergeKit returns the single input itself (base not subtracted)
        return chunk.input(0, out=chunk.scratch(0))
    c = multislerp_coefficients(stats["gram"], p.column("weight"), bool(p.glob.get("normalize_weights", True)),
                                float(p.glob.get("eps", 1e-8)), chunk.name)
    if chunk.has_base:
        # sum c_i (x_i - b) + b, on the task vectors: a zero task vector may carry a huge
        # coefficient (w / eps), which must multiply an exact 0, not cancel x_i against b
        b = chunk.base(out=chunk.scratch(2))
        out = weighted_delta_sum(chunk, b, [float(x) for x in c])
        out.add_(b)
        return out
    return weighted_sum(chunk, [float(x) for x in c])


def _karcher_apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    if chunk.n_inputs == 1:
        return chunk.input(0, out=chunk.scratch(0))
    c = karcher_coefficients(stats["gram"], int(p.glob.get("max_iter", 10)), float(p.glob.get("tol", 1e-5)))
    return weighted_sum(chunk, [float(x) for x in c])


def _passes(p: TensorParams, shape: tuple[int, ...]) -> tuple[StatPass, ...]:
    return (_gram_pass(),) if len(p.per_input) > 1 else ()


MULTISLERP = Method(
    name="multislerp",
    pretty_name="Multi-SLERP",
    reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    params=(
        ParamSpec(name="weight", scope="model", doc="weight of this model on the sphere"),
        ParamSpec(name="normalize_weights", scope="global", default=True, kind="bool"),
        ParamSpec(name="eps", scope="global", default=1e-8, range=check_range(0, None, lo_open=True)),
    ),
    apply=_multislerp_apply,
    base="optional",
    passes=_passes,
    working_copies=lambda n: n + 2,
    temporaries=lambda n: 6,
)

KARCHER = Method(
    name="karcher",
    pretty_name="Karcher Mean",
    reference_url="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    params=(
        ParamSpec(name="max_iter", scope="global", default=10, kind="int", range=check_range(1, None)),
        ParamSpec(name="tol", scope="global", default=1e-5, range=check_range(0, None, lo_open=True)),
    ),
    apply=_karcher_apply,
    passes=_passes,
    working_copies=lambda n: n + 2,
    temporaries=lambda n: 6,
)
