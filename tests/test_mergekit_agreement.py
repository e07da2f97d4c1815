"""Agreement with MergeKit 0.1.5: our outputs against MergeKit's, kept in tests/golden/.

tests/golden/ holds three tiny float32 dense Llama checkpoints (base + two fine-tunes; 2 layers,
and a 4-layer variant for the layer-gradient cases), one MergeKit config per case, MergeKit's
output of every deterministic case and statistics of its random methods;
`scripts/mergekit_golden.py` regenerates them (MergeKit is not needed here).

Tolerances:
- Deterministic methods: |ours - MergeKit| <= 1e-5 * max(1, |MergeKit|) per element (1e-5
  absolute below magnitude 1, relative above). Both compute in float32 on float32 configs.
- Random methods (dare_*, della*): masks cannot match element for element (methods.md,
  "Randomness"), so we compare, per tensor, the kept fraction and L1 rescale factor of each
  task vector and the mean and norm of the result, each within 5 standard deviations of the
  difference of two independent draws (sd from Monte-Carlo draws of MergeKit's sampling
  model: Bernoulli(density) for DARE, rank-based keep probabilities for DELLA). Our masks
  and factors are read from probe merges that give one input weight 1 and the others 0
  (masks are keyed by seed, tensor name and input index, not by weights); given them, our
  result must be MergeKit's formula to 1e-5.
- One tensor (the golden MANIFEST's `quantized`) has fine-tune deltas on a 2^-9 grid, so |d|
  has many exact ties, as bf16 fine-tunes do. Where a selection threshold falls inside such a
  tie, MergeKit keeps whichever entries its unstable sort returns; we follow methods.md
  (test_tied_selection_follows_methods_md checks both sides).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import moemerge
from moemerge.methods import REGISTRY, TensorParams
from tests.reference_methods import AMBIGUOUS, FAMILY, REFERENCES

GOLDEN = Path(__file__).parent / "golden"
MANIFEST = json.loads((GOLDEN / "MANIFEST.json").read_text())
QUANTIZED = MANIFEST["special_tensors"]["quantized"]

ATOL = 1e-5  # per element, relative above magnitude 1
SIGMAS = 5.0  # statistical checks: this many sd of the difference of two independent draws
MC_DRAWS = 256
#: Methods whose selection (top-k of |d| or of the variance) depends on how ties are broken.
_SELECTING = {"ties", "breadcrumbs", "breadcrumbs_ties", "sce"}

#: (case, tensor) -> why we still disagree with MergeKit there: moemerge bugs, reported, not
#: excused. Each is checked by a strict xfail, so a fix makes the suite fail until its entry is
#: removed here.
#: (case, tensor) -> why moemerge disagrees with MergeKit there (a bug to fix): each entry is a
#: strict xfail below, so fixing the bug makes the test fail until the entry is removed.
KNOWN_BUGS: dict[tuple[str, str], str] = {}

CASES = tuple(MANIFEST["cases"])
RANDOM = tuple(MANIFEST["random"])
DETERMINISTIC = tuple(c for c in CASES if c not in RANDOM)


# -- golden files ---------------------------------------------------------------------------------

@cache
def _golden_config(case: str) -> dict[str, Any]:
    doc = yaml.safe_load((GOLDEN / "configs" / f"{case}.yaml").read_text())
    if "base_model" in doc:
        doc["base_model"] = str(GOLDEN / doc["base_model"])
    for m in doc["models"]:
        m["model"] = str(GOLDEN / m["model"])
    return doc


def _config(case: str) -> dict[str, Any]:
    """The case's MergeKit config with its golden-relative model paths made absolute (a copy)."""
    return copy.deepcopy(_golden_config(case))


def _method(case: str) -> str:
    return str(_golden_config(case)["merge_method"])


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@cache
def _input(path: str) -> dict[str, torch.Tensor]:
    """The tensors of one golden input checkpoint (an absolute path from _config)."""
    return load_file(str(Path(path) / "model.safetensors"))


@cache
def _tensor_params(case: str) -> dict[str, TensorParams]:
    """Parameters per tensor as resolved by our planner (checked against MergeKit by the goldens)."""
    return {t.name: t.params for t in moemerge.plan(_config(case)).tensors}


def _stats(case: str) -> dict[str, Any]:
    return json.loads((GOLDEN / "stats" / f"{case}.json").read_text())["tensors"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """merged(key, config) -> our output tensors; each key is merged once per module."""
    done: dict[str, dict[str, torch.Tensor]] = {}

    def run(key: str, config: dict[str, Any]) -> dict[str, torch.Tensor]:
        if key not in done:
            out = tmp_path_factory.mktemp(key.replace(":", "_")) / "out"
            moemerge.run(config, str(out))
            done[key] = _load_dir(out)
        return done[key]

    return run


def _base_and_deltas(case: str, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Base and the task vectors x_i - b (float32, as both engines compute them), config order."""
    doc = _golden_config(case)
    b = _input(doc["base_model"])[name]
    return b, [_input(m["model"])[name] - b for m in doc["models"] if m["model"] != doc["base_model"]]


def _too_far(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    ref = ref.double()
    return (ours.double() - ref).abs() > ATOL * ref.abs().clamp_min(1.0)


# -- coverage -------------------------------------------------------------------------------------

def test_every_mergekit_method_has_a_golden_case() -> None:
    methods = {_method(c) for c in CASES}
    # arcee_fusion, ram, ramplus_tl: tests/golden/methods3 (tests/test_methods_mergekit3.py)
    methods |= {yaml.safe_load(p.read_text())["merge_method"] for p in (GOLDEN / "methods3" / "configs").glob("*.yaml")}
    ours = set(REGISTRY) - {"sma", "wma", "ema", "minus-sqrt"}  # PMA averages are not MergeKit methods
    assert ours <= methods, f"no MergeKit golden case for {sorted(ours - methods)}: add one to scripts/mergekit_golden.py"


def test_golden_inputs_are_what_the_manifest_says() -> None:
    import hashlib

    for rel, digest in MANIFEST["files"].items():
        assert hashlib.sha256((GOLDEN / rel).read_bytes()).hexdigest() == digest, f"{rel} changed; rerun the script"


# -- deterministic methods ------------------------------------------------------------------------

def _tie_exception(case: str, name: str) -> bool:
    """True where MergeKit breaks ties of a selection its own way (checked in the test below)."""
    method = _method(case)
    if method not in _SELECTING or name != QUANTIZED:
        return False
    return method != "sce" or float(_tensor_params(case)[name].glob.get("select_topk", 1.0)) < 1


@pytest.mark.parametrize("case", DETERMINISTIC)
def test_output_matches_mergekit(case: str, merged: Callable[..., dict[str, torch.Tensor]]) -> None:
    ours = merged(case, _config(case))
    ref = load_file(str(GOLDEN / "outputs" / f"{case}.safetensors"))
    assert sorted(ours) == sorted(ref)
    problems = []
    for name, r in ref.items():
        assert ours[name].dtype == r.dtype == torch.float32, name
        if _tie_exception(case, name) or (case, name) in KNOWN_BUGS:
            continue
        bad = _too_far(ours[name], r)
        if bad.any():
            diff = (ours[name].double() - r.double()).abs()
            problems.append(f"{name}: {int(bad.sum())}/{r.numel()} elements off, max |diff| {diff.max():.3g}")
    assert not problems, f"{case} differs from MergeKit 0.1.5:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("case, name", [
    pytest.param(c, n, marks=pytest.mark.xfail(strict=True, reason=why)) for (c, n), why in KNOWN_BUGS.items()
] or [pytest.param("", "", marks=pytest.mark.skip(reason="no known disagreements"))])
def test_known_bug_still_disagrees(case: str, name: str, merged: Callable[..., dict[str, torch.Tensor]]) -> None:
    ours = merged(case, _config(case))[name]
    ref = load_file(str(GOLDEN / "outputs" / f"{case}.safetensors"))[name]
    bad = _too_far(ours, ref)
    assert not bad.any(), f"{case} {name}: max |diff| {(ours.double() - ref.double()).abs().max():.3g}"


def _selection(method: str, d: torch.Tensor, per: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(methods.md keep-mask, entries tied at a cut) of one task vector for ties/breadcrumbs.

    methods.md, magnitude: "keep the k = max(1, floor(p n)) entries of largest |d| ... Ties at
    the threshold: keep the lowest flat indices first". Outliers keep descending ranks
    [top, top + keep) of the same order (ties by lowest flat index), as our engine does.
    """
    a = d.abs().reshape(-1).double()
    n = a.numel()
    p = float(per.get("density", 1.0))
    if p >= 1:
        return torch.ones_like(d, dtype=torch.bool), torch.zeros_like(d, dtype=torch.bool)
    if FAMILY[method][0] == "magnitude":
        lo, hi = 0, (0 if p <= 0 else max(1, math.floor(p * n)))
    else:
        keep, top = math.floor(p * n), math.floor(float(per.get("gamma", 0.01)) * n)
        bottom = max(0, n - keep - top)
        lo, hi = n - bottom - keep, n - bottom
    order = torch.argsort(-a, stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[lo:hi]] = True
    srt = a[order]
    tied = torch.zeros(n, dtype=torch.bool)
    for cut in (lo, hi):
        if 0 < cut < n and srt[cut - 1] == srt[cut]:
            tied |= a == srt[cut]
    return mask.reshape(d.shape), tied.reshape(d.shape)


def _mix(method: str, b: torch.Tensor, weighted: torch.Tensor, w: list[float], p: TensorParams) -> torch.Tensor:
    """MergeKit's generalized_task_arithmetic after sparsify: D_i stacked on dim 0 -> output."""
    _, consensus, normalize, _ = FAMILY[method]
    wt = torch.tensor(w, dtype=weighted.dtype).reshape(-1, *([1] * (weighted.dim() - 1)))
    if consensus:
        sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
        agree = weighted.sign() == sign
        mixed = (weighted * agree).sum(0)
        div = (wt * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed = weighted.sum(0)
        div = wt.sum(0)
        div[div.abs() < 1e-8] = 1
    if p.glob.get("normalize", normalize):
        mixed = mixed / div
    lam = float(p.glob.get("lambda", 1.0))
    if lam != 1:
        mixed = mixed * lam
    return b + mixed


def _sce_with_mask(b: torch.Tensor, ds: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """methods.md's sce (float64) with a given variance-selection mask."""
    tv = torch.stack(ds).double() * keep
    eta = tv.square().reshape(len(ds), -1).mean(1)
    eta = eta / eta.sum() if eta.sum().abs() >= 1e-6 else torch.full_like(eta, 1 / len(ds))
    erase = tv.sign() == torch.where(tv.sum(0) >= 0, 1.0, -1.0).double()
    ew = eta.reshape(-1, *([1] * b.dim())) * erase
    return b.double() + (tv * ew).sum(0) / ew.sum(0).clamp_min(1e-6)


@pytest.mark.parametrize("case", [c for c in DETERMINISTIC if _tie_exception(c, QUANTIZED)])
def test_tied_selection_follows_methods_md(case: str, merged: Callable[..., dict[str, torch.Tensor]]) -> None:
    """On the tied tensor, we follow methods.md, and MergeKit differs only in which tied entries it keeps.

    methods.md (magnitude): "Exact k-th largest by selection. Ties at the threshold: keep the
    lowest flat indices first, so exactly k survive." For outliers and sce it names no tie
    rule; our engine and tests/reference_methods.py use the same one there (by value
    descending, lowest flat index first). MergeKit 0.1.5 takes the first k of
    `torch.argsort(|d|, descending=True)` for ties, a window of `torch.sort(|d|)` for
    breadcrumbs and `torch.topk(var, k)` for sce: unstable, so among tied entries it keeps
    whichever the sort returns. So: (1) ours equals the methods.md reference; (2) MergeKit's
    output is one that some choice among the tied entries gives (every other entry kept or
    dropped exactly as methods.md says).
    """
    method = _method(case)
    b, ds = _base_and_deltas(case, QUANTIZED)
    p = _tensor_params(case)[QUANTIZED]
    per = [dict(x) for x in p.per_input]
    ours = merged(case, _config(case))[QUANTIZED]
    mk = load_file(str(GOLDEN / "outputs" / f"{case}.safetensors"))[QUANTIZED]
    xs = [(b + d).double() for d in ds]
    assert all(torch.equal(x.float(), _input(m["model"])[QUANTIZED]) for x, m in zip(xs, _golden_config(case)["models"]))

    # (1) ours is the methods.md reference (tests/reference_methods.py), but where the sign
    # election is an exact tie that float32 rounding decides (reference_methods.AMBIGUOUS)
    AMBIGUOUS.pop("last", None)
    ref = REFERENCES[method](b.double(), xs, per, dict(p.glob), QUANTIZED)
    bad = _too_far(ours, ref) & ~AMBIGUOUS.get("last", torch.zeros_like(ref, dtype=torch.bool))
    assert not bad.any(), f"{case}: {int(bad.sum())} entries differ from methods.md's reference"

    if method == "sce":
        # (2) MergeKit's selection is readable from its output: an unselected position is the
        # base exactly; a selected one moves by a non-zero multiple of 2^-9 at least
        var = torch.stack(ds).double().var(0, unbiased=False)
        k = math.floor(float(p.glob["select_topk"]) * int(torch.count_nonzero(var)))
        thr = var.reshape(-1).sort(descending=True).values[k - 1]
        picked = mk != b
        assert int(picked.sum()) == k
        assert bool(((var > thr) <= picked).all()) and bool((picked <= (var >= thr)).all()), (
            "MergeKit selected a position that is not tied at the k-th variance")
        replay = _sce_with_mask(b, ds, picked)
        assert not _too_far(replay, mk).any(), "sce with MergeKit's own selection does not give its output"
        return

    # (2) per element, try keeping or dropping each input's tied entry (all in float32, as MergeKit)
    sel = [_selection(method, d, pp) for d, pp in zip(ds, per)]
    w = p.column("weight")
    candidates = []
    for choice in itertools.product((False, True), repeat=len(ds)):
        masks = [torch.where(tied, c, m) for (m, tied), c in zip(sel, choice)]
        weighted = torch.stack([d * m * torch.tensor(wi, dtype=torch.float32) for d, m, wi in zip(ds, masks, w)])
        candidates.append(_mix(method, b, weighted, w, p))
    explained = torch.zeros_like(b, dtype=torch.bool)
    for c in candidates:
        explained |= ~_too_far(c, mk)
    assert explained.all(), (f"{case}: MergeKit differs at {int((~explained).sum())} entries that no choice "
                             "among tied magnitudes explains")


# -- random methods: statistics -------------------------------------------------------------------

def _keep_probs(method: str, d: torch.Tensor, per: dict[str, Any]) -> torch.Tensor:
    """Keep probability of each entry (methods.md): density for DARE; DELLA: p - e + 2 e r by rank."""
    p = float(per.get("density", 1.0))
    if p >= 1:
        return torch.ones_like(d, dtype=torch.float64)
    if FAMILY[method][0] == "random":
        return torch.full_like(d, p, dtype=torch.float64)
    assert d.dim() <= 2, "the golden models have 1-D and 2-D tensors only"
    rows = d.abs().reshape(-1, d.shape[-1]).double()  # ranks along dim 1; a 1-D tensor is one row
    m = rows.shape[1]
    r = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1).double() / max(m - 1, 1)
    e = float(per.get("epsilon", 0.15))
    return ((p - e) + 2 * e * r).reshape(d.shape)


def _rescaled(d: torch.Tensor, keep: torch.Tensor, rescale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor per draw, kept and rescaled d): MergeKit's L1 rule, skipped under 1e-7."""
    dims = tuple(range(keep.dim() - d.dim(), keep.dim()))
    full = d.abs().double().sum()
    kept = (d.abs().double() * keep).sum(dims)
    f = torch.where((full >= 1e-7) & (kept >= 1e-7), full / kept.clamp_min(1e-300), torch.ones_like(kept))
    if not rescale:
        f = torch.ones_like(f)
    return f, d.double() * keep * f.reshape(-1, *([1] * d.dim()))


@cache
def _monte_carlo(case: str, name: str) -> dict[str, torch.Tensor]:
    """MC_DRAWS draws of MergeKit's sampling model: kept fraction / factor per input, result mean / norm."""
    method = _method(case)
    b, ds = _base_and_deltas(case, name)
    p = _tensor_params(case)[name]
    gen = torch.Generator().manual_seed(0)
    weighted, kept, factors = [], [], []
    for d, per, w in zip(ds, p.per_input, p.column("weight")):
        keep = torch.rand((MC_DRAWS, *d.shape), generator=gen, dtype=torch.float64) < _keep_probs(method, d, per)
        f, dk = _rescaled(d, keep, bool(p.glob.get("rescale", FAMILY[method][3])))
        weighted.append(w * dk)
        kept.append(keep.reshape(MC_DRAWS, -1).double().mean(1))
        factors.append(f)
    out = _mix(method, b.double(), torch.stack(weighted), p.column("weight"), p).reshape(MC_DRAWS, -1)
    return {"kept": torch.stack(kept), "factor": torch.stack(factors), "mean": out.mean(1), "norm": out.norm(dim=1)}


def _probe_config(case: str, j: int) -> dict[str, Any]:
    """The case with weight 1 on input j and 0 on the others: the output is b + f_j m_j d_j."""
    doc = _config(case)
    for i, m in enumerate(doc["models"]):
        m.setdefault("parameters", {})["weight"] = 1.0 if i == j else 0.0
    return doc


def _our_masks(case: str, merged: Callable[..., dict[str, torch.Tensor]], name: str
               ) -> list[tuple[torch.Tensor, float] | None]:
    """Per input: our keep-mask and rescale factor from the probe merges (None: d is all zero)."""
    b, ds = _base_and_deltas(case, name)
    out: list[tuple[torch.Tensor, float] | None] = []
    for j, d in enumerate(ds):
        moved = (merged(f"{case}:probe{j}", _probe_config(case, j))[name] - b).double()
        if not d.any():
            assert not moved.any(), f"{name}: input {j} has a zero task vector but the probe moved"
            out.append(None)
            continue
        keep = moved != 0
        out.append((keep, float(moved.abs().sum() / (d.double().abs() * keep).sum())))
    return out


def _close(ours: float, theirs: float, sd: float, what: str) -> str | None:
    tol = SIGMAS * math.sqrt(2) * sd + 1e-6
    if abs(ours - theirs) <= tol:
        return None
    return f"{what}: ours {ours:.6g}, MergeKit {theirs:.6g} (|diff| {abs(ours - theirs):.3g} > {tol:.3g})"


@pytest.mark.parametrize("case", RANDOM)
def test_kept_fraction_and_rescale_match_mergekit(case: str, merged: Callable[..., dict[str, torch.Tensor]]) -> None:
    golden = _stats(case)
    problems: list[str] = []
    n_inputs = len(next(iter(golden.values()))["inputs"])
    totals = torch.zeros(n_inputs, 4, dtype=torch.float64)  # per input: kept ours and MergeKit's, variance, n
    for name, entry in golden.items():
        b, ds = _base_and_deltas(case, name)
        mc = _monte_carlo(case, name)
        p = _tensor_params(case)[name]
        rescale = bool(p.glob.get("rescale", True))
        for j, (d, mine) in enumerate(zip(ds, _our_masks(case, merged, name))):
            mk = entry["inputs"][j]
            assert mk["index"] == j and mk["numel"] == d.numel()
            # the recorder saw the same task vector
            assert math.isclose(mk["l1_full"], float(d.double().abs().sum()), rel_tol=1e-5, abs_tol=1e-9), name
            if mine is None:  # zero task vector: nothing kept to rescale (L1 under 1e-7)
                assert mk["factor"] == 1.0, name
                continue
            keep, f = mine
            # our factor is MergeKit's rule exactly: L1(d) / L1(kept d) over the whole tensor
            rule = float(d.double().abs().sum() / (d.double().abs() * keep).sum()) if rescale else 1.0
            assert math.isclose(f, rule, rel_tol=1e-4), f"{name}: input {j} rescaled by {f}, L1 rule gives {rule}"
            kf = float(keep.double().mean())
            problems += filter(None, [
                _close(kf, mk["kept_fraction"], float(mc["kept"][j].std()), f"{name} input {j} kept fraction"),
                _close(f, mk["factor"], float(mc["factor"][j].std()), f"{name} input {j} rescale factor"),
            ])
            totals[j] += torch.tensor([kf * d.numel(), mk["kept_fraction"] * d.numel(),
                                       float(mc["kept"][j].var()) * d.numel() ** 2, d.numel()])
    for j, (ours, theirs, var, n) in enumerate(totals.tolist()):  # whole model: pinned far tighter
        problems += filter(None, [_close(ours / n, theirs / n, math.sqrt(var) / n, f"whole model: input {j} kept fraction")])
    assert not problems, f"{case}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("case", RANDOM)
def test_random_result_is_mergekit_formula_on_our_masks(case: str, merged: Callable[..., dict[str, torch.Tensor]]) -> None:
    """Given our masks and factors, the result is MergeKit's generalized task arithmetic to 1e-5."""
    method = _method(case)
    ours = merged(case, _config(case))
    for name in _stats(case):
        b, ds = _base_and_deltas(case, name)
        p = _tensor_params(case)[name]
        weighted = []
        for d, mine, w in zip(ds, _our_masks(case, merged, name), p.column("weight")):
            keep, f = mine if mine is not None else (torch.zeros_like(d, dtype=torch.bool), 1.0)
            weighted.append(w * f * d.double() * keep)
        stacked = torch.stack(weighted)
        expect = _mix(method, b.double(), stacked, p.column("weight"), p)
        # an exact tie of the sign election is decided by rounding (as in reference_methods)
        tie = (stacked.sum(0).abs() <= 2.0**-20 * stacked.abs().sum(0)) & (stacked.abs().sum(0) > 0)
        bad = _too_far(ours[name], expect) & ~tie
        assert not bad.any(), f"{case} {name}: {int(bad.sum())} entries are not MergeKit's formula on our masks"


@pytest.mark.parametrize("case", RANDOM)
def test_random_result_mean_and_norm_match_mergekit(case: str, merged: Callable[..., dict[str, torch.Tensor]]) -> None:
    ours = merged(case, _config(case))
    problems: list[str] = []
    for name, entry in _stats(case).items():
        mc = _monte_carlo(case, name)
        t = ours[name].double()
        problems += filter(None, [
            _close(float(t.mean()), entry["mean"], float(mc["mean"].std()), f"{name} mean"),
            _close(float(t.norm()), entry["norm"], float(mc["norm"].std()), f"{name} norm"),
        ])
    assert not problems, f"{case}:\n  " + "\n  ".join(problems)
