"""arcee_fusion, ram and ramplus_tl: float64 references, chunk invariance, bad parameters, MergeKit goldens.

The references (tests/reference_methods.py) are MergeKit 0.1.5's formulas on whole float64
tensors. Inputs are fresh random tensors every run (the seed is printed on failure); each
merge runs with one-row chunks, an odd chunk size and whole tensors, which must give the same
bytes. The goldens (tests/golden/methods3/, from scripts/mergekit_golden_methods3.py) are
MergeKit's own outputs on the tiny float32 Llama inputs of tests/golden/inputs/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import moemerge
from moemerge.errors import ConfigError
from moemerge.methods import REGISTRY
from moemerge.methods.arcee_fusion import fusion_threshold, quartile_indices
from moemerge.methods.ram import ramplus_lambdas
from tests.conftest import write_checkpoint
from tests.reference_methods import AMBIGUOUS, REFERENCES, stat_bound

METHODS = ("arcee_fusion", "ram", "ramplus_tl")
GOLDEN = Path(__file__).parent / "golden"
METHODS3 = GOLDEN / "methods3"

#: 1-D (one softmax over the whole vector, streamed), tiny (n <= 4: q1 is the minimum),
#: a single element, 2-D and 3-D (one softmax per row; rows of one element), a wide row;
#: none a multiple of a chunk size.
SHAPES = {"vec": (67,), "tiny": (3,), "one": (1,), "mat": (29, 23), "col": (7, 1), "cube": (3, 7, 11), "wide": (5, 301)}
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}

# method -> (global parameters, number of non-base models); epsilon near the task vectors'
# scale (0.3 randn) so that every count c = 0, 1, 2+ of moved models occurs
CASES: dict[str, list[tuple[dict[str, Any], int]]] = {
    "arcee_fusion": [({}, 1)],
    "ram": [({}, 2), ({"epsilon": 0.25}, 3)],
    "ramplus_tl": [({}, 3), ({"epsilon": 0.3, "r": 0.5, "alpha": 2.0}, 3), ({"epsilon": 0.2, "r": 1.0, "alpha": 0.1}, 2)],
}


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _models(tmp: Path, shapes: dict[str, tuple[int, ...]], n: int, dtype: torch.dtype,
            gen: torch.Generator, spread: float = 0.3) -> tuple[list[dict[str, torch.Tensor]], list[Path]]:
    """Base + n models: base randn, each model base + spread * randn (never zeros), in `dtype`."""
    base = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    sds, paths = [], []
    for i in range(n + 1):
        sd = {k: (v if i == 0 else v + spread * torch.randn(v.shape, generator=gen, dtype=torch.float64)).to(dtype)
              for k, v in base.items()}
        sds.append(sd)
        paths.append(write_checkpoint(tmp / f"m{i}", sd, shards=2 if i % 2 else 1))
    return sds, paths


def _doc(method: str, glob: dict[str, Any], paths: list[Path]) -> dict[str, Any]:
    doc: dict[str, Any] = {"merge_method": method, "base_model": str(paths[0]),
                           "models": [{"model": str(p)} for p in paths[1:]]}
    if glob:
        doc["parameters"] = dict(glob)
    return doc


def _run(doc: dict[str, Any], out: Path, **kw: Any) -> dict[str, torch.Tensor]:
    moemerge.run(doc, str(out), **kw)
    merged: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(str(f)))
    return merged


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(fi.tiny)))) * fi.eps


def _defaults(method: str, glob: dict[str, Any]) -> dict[str, Any]:
    return {**{s.name: s.default for s in REGISTRY[method].params}, **glob}


PARAMS = [pytest.param(m, i, d, id=f"{m}-{i}-{d}") for m, cases in CASES.items()
          for i in range(len(cases)) for d in DTYPES]


@pytest.mark.parametrize("method,case,dtype_name", PARAMS)
def test_matches_float64_reference_at_every_chunk_size(tmp_path: Path, method: str, case: int, dtype_name: str) -> None:
    glob, n = CASES[method][case]
    dtype = DTYPES[dtype_name]
    seed = _seed()
    sds, paths = _models(tmp_path, SHAPES, n, dtype, torch.Generator().manual_seed(seed))
    doc = _doc(method, glob, paths)
    whole = _run(doc, tmp_path / "whole")
    one = _run(doc, tmp_path / "one", chunk_rows=1, memory_budget="1MB")
    odd = _run(doc, tmp_path / "odd", chunk_rows=3)
    full = _defaults(method, glob)
    for name in SHAPES:
        got = whole[name]
        assert got.dtype == dtype and got.shape == sds[0][name].shape, name
        # chunk invariance: the same bytes for one-row, odd and whole-tensor chunks
        assert torch.equal(got.view(torch.uint8), one[name].view(torch.uint8)), f"{name}: one-row chunks differ (seed {seed})"
        assert torch.equal(got.view(torch.uint8), odd[name].view(torch.uint8)), f"{name}: odd chunks differ (seed {seed})"
        base = sds[0][name].double()
        xs = [sd[name].double() for sd in sds[1:]]
        AMBIGUOUS.clear()
        ref = REFERENCES[method](base, xs, [{} for _ in xs], full, name=name)
        err = (got.double() - ref).abs()
        if "last" in AMBIGUOUS:  # importance within rounding of the threshold: either side is right
            tie = AMBIGUOUS["last"]
            assert int(tie.sum()) <= max(1, tie.numel() // 100), f"{name}: {int(tie.sum())} near-threshold elements"
            err = torch.where(tie, 0.0, err)
        bound = _ulp(ref, dtype) + stat_bound(base, xs, [{} for _ in xs], full)
        worst = (err - bound).max().item()
        assert worst <= 0, f"{method} {name}: error exceeds 1 ulp + fp32 bound by {worst:g} (seed {seed})"


def test_arcee_fusion_keeps_the_outliers_and_is_not_trivial(tmp_path: Path) -> None:
    """The mask is neither empty nor full, and moved elements are exactly the other model's."""
    seed = _seed()
    sds, paths = _models(tmp_path, {"w": (64, 48)}, 1, torch.float32, torch.Generator().manual_seed(seed))
    out = _run(_doc("arcee_fusion", {}, paths), tmp_path / "out")["w"]
    b, x = sds[0]["w"], sds[1]["w"]
    took = out != b
    assert 0 < int(took.sum()) < b.numel() // 2, f"kept {int(took.sum())} of {b.numel()} (seed {seed})"
    assert torch.equal(out[took], (b + (x - b))[took])
    assert torch.equal(out[~took], b[~took])


def test_ram_counts_every_case_of_moved_models(tmp_path: Path) -> None:
    """With epsilon inside the task vectors' range, elements moved by 0, 1 and 2+ models all occur."""
    seed = _seed()
    sds, paths = _models(tmp_path, {"w": (40, 30)}, 3, torch.float32, torch.Generator().manual_seed(seed))
    eps = 0.25
    out = _run(_doc("ram", {"epsilon": eps}, paths), tmp_path / "out")["w"].double()
    b = sds[0]["w"]
    ds = torch.stack([sd["w"] - b for sd in sds[1:]])  # float32, as the engine computes them
    moved = ds.abs() > eps
    c = moved.sum(0)
    assert {0, 1, 2, 3} <= set(c.unique().tolist()), f"counts {c.unique().tolist()} (seed {seed})"
    assert torch.equal(out[c == 0], b.double()[c == 0])  # nothing moved: the base
    one = c == 1  # one model moved: its value exactly
    assert torch.equal(out[one], (b + (ds * moved).sum(0))[one].double())


def test_ramplus_lambdas_follow_mergekit_float32() -> None:
    # shared 5, unique 0: rho = 5 / 1e-5, clamped to alpha 0.2 -> 1 + 0.1 * 0.2 in float32
    assert ramplus_lambdas(torch.tensor([[5, 0]]).numpy(), 0.1, 0.2, 1e-5) == [float(torch.tensor(1.02, dtype=torch.float32))]
    # nothing moved: rho 0 -> lambda 1 (not NaN: epsilon > 0 is enforced)
    assert ramplus_lambdas(torch.tensor([[0, 0]]).numpy(), 0.1, 0.2, 1e-5) == [1.0]
    r = torch.tensor(3.0, dtype=torch.float32) / torch.tensor(7.0, dtype=torch.float32)
    want = 1 + 0.5 * r.clamp(0, 2.0)
    assert ramplus_lambdas(torch.tensor([[3, 7]]).numpy(), 0.5, 2.0, 1e-5) == [float(want)]


def test_quartile_indices_are_mergekits() -> None:
    for n in (1, 2, 3, 4, 5, 10, 67, 1000, 999_999, 1_000_000):
        q = torch.tensor([0.25, 0.5, 0.75])  # MergeKit: (q * (n - 1)).long(), float32 q
        assert quartile_indices(n) == tuple((q * (n - 1)).long().tolist()), n
    t = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float32)
    assert fusion_threshold(*t.tolist()) == float(t[1] + 1.5 * (t[2] - t[0]))


def test_arcee_fusion_quartiles_are_exact_on_tensors_mergekit_samples(tmp_path: Path) -> None:
    """Over 1,000,000 elements MergeKit samples; we select exactly over all of them (streamed here)."""
    seed = _seed()
    sds, paths = _models(tmp_path, {"big": (1031, 977)}, 1, torch.float32, torch.Generator().manual_seed(seed))
    got = _run(_doc("arcee_fusion", {}, paths), tmp_path / "out", chunk_rows=257)["big"]  # 4 chunks + 3 rows
    AMBIGUOUS.clear()
    ref = REFERENCES["arcee_fusion"](sds[0]["big"].double(), [sds[1]["big"].double()], [{}], {})
    bad = ((got.double() - ref).abs() > 1e-6 * ref.abs().clamp_min(1.0)) & ~AMBIGUOUS["last"]
    assert not bad.any(), f"{int(bad.sum())} elements differ from the exact reference (seed {seed})"


def test_arcee_fusion_vector_softmax_spans_chunks_and_blocks(tmp_path: Path) -> None:
    """A 1-D tensor is one softmax vector: its kl is streamed (max, sum, kl passes) over chunks
    and over the cache-sized blocks inside one chunk, with the same bytes either way."""
    seed = _seed()
    sds, paths = _models(tmp_path, {"v": (66_001,)}, 1, torch.float32, torch.Generator().manual_seed(seed))
    doc = _doc("arcee_fusion", {}, paths)
    whole = _run(doc, tmp_path / "whole")["v"]  # one chunk, two stats.BLOCKs
    streamed = _run(doc, tmp_path / "streamed", chunk_rows=16_411)["v"]  # five chunks
    assert torch.equal(whole.view(torch.uint8), streamed.view(torch.uint8)), f"seed {seed}"
    AMBIGUOUS.clear()
    ref = REFERENCES["arcee_fusion"](sds[0]["v"].double(), [sds[1]["v"].double()], [{}], {})
    bad = ((whole.double() - ref).abs() > 1e-6 * ref.abs().clamp_min(1.0)) & ~AMBIGUOUS["last"]
    assert not bad.any(), f"{int(bad.sum())} elements differ from the exact reference (seed {seed})"
    assert 0 < int((whole != sds[0]["v"]).sum()) < whole.numel() // 2


# -- bad parameters and inputs: refused before any output ------------------------------------------

BAD = [
    pytest.param("ram", {"epsilon": -1e-3}, 2, "epsilon must be in", id="ram-negative-epsilon"),
    pytest.param("ramplus_tl", {"epsilon": 0.0}, 2, "epsilon must be in", id="ramplus-zero-epsilon"),
    pytest.param("ramplus_tl", {"alpha": -0.1}, 2, "alpha", id="ramplus-negative-alpha"),
    pytest.param("ramplus_tl", {"r": -0.5}, 2, "parameters.r`", id="ramplus-negative-r"),
    pytest.param("ramplus_tl", {"r": float("nan")}, 2, "parameters.r`", id="ramplus-nan-r"),
    pytest.param("arcee_fusion", {}, 2, "at most 1 model", id="fusion-two-models"),
    pytest.param("arcee_fusion", {"t": 0.5}, 1, "unknown parameter", id="fusion-unknown-parameter"),
]


@pytest.mark.parametrize("method,glob,n,word", BAD)
def test_bad_parameters_are_refused_before_work(tmp_path: Path, method: str, glob: dict[str, Any], n: int, word: str) -> None:
    _, paths = _models(tmp_path, {"w": (4, 5)}, n, torch.float32, torch.Generator().manual_seed(_seed()))
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        moemerge.run(_doc(method, glob, paths), str(out))
    assert word in str(e.value), str(e.value)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("method", METHODS)
def test_a_base_model_is_required(tmp_path: Path, method: str) -> None:
    _, paths = _models(tmp_path, {"w": (4, 5)}, 2, torch.float32, torch.Generator().manual_seed(_seed()))
    doc = {"merge_method": method, "models": [{"model": str(p)} for p in paths[1:]]}
    with pytest.raises(ConfigError, match="base_model"):
        moemerge.run(doc, str(tmp_path / "out"))


# -- MergeKit 0.1.5's own outputs ------------------------------------------------------------------

def _manifest() -> dict[str, Any]:
    path = METHODS3 / "MANIFEST.json"
    return json.loads(path.read_text()) if path.exists() else {"cases": []}


GOLDEN_CASES = tuple(_manifest()["cases"])


def test_every_new_method_has_a_golden_case() -> None:
    methods = {yaml.safe_load((METHODS3 / "configs" / f"{c}.yaml").read_text())["merge_method"] for c in GOLDEN_CASES}
    assert set(METHODS) <= methods, "run scripts/mergekit_golden_methods3.py"


def test_golden_files_are_what_the_manifest_says() -> None:
    import hashlib

    for rel, digest in _manifest()["files"].items():
        assert hashlib.sha256((METHODS3 / rel).read_bytes()).hexdigest() == digest, f"{rel} changed; rerun the script"


def _golden_doc(case: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((METHODS3 / "configs" / f"{case}.yaml").read_text())
    doc["base_model"] = str(GOLDEN / doc["base_model"])
    for m in doc["models"]:
        m["model"] = str(GOLDEN / m["model"])
    return doc


def _golden_io(case: str, tmp: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ours, MergeKit's, base, other model) of a golden case."""
    doc = _golden_doc(case)
    ours = _run(doc, tmp / "out")
    ref = load_file(str(METHODS3 / "outputs" / f"{case}.safetensors"))
    base = load_file(str(Path(doc["base_model"]) / "model.safetensors"))
    other = [m["model"] for m in doc["models"] if m["model"] != doc["base_model"]][-1]
    assert sorted(ours) == sorted(ref) == sorted(base)
    return ours, ref, base, load_file(str(Path(other) / "model.safetensors"))


def _off(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (ours.double() - ref.double()).abs() > 1e-5 * ref.double().abs().clamp_min(1.0)


@pytest.mark.parametrize("case", [c for c in GOLDEN_CASES if not c.startswith("arcee_fusion")])
def test_output_matches_mergekit(tmp_path: Path, case: str) -> None:
    ours, ref, base, _ = _golden_io(case, tmp_path)
    problems = []
    for name, r in ref.items():
        assert ours[name].dtype == r.dtype == torch.float32, name
        bad = _off(ours[name], r)
        if bad.any():
            diff = (ours[name].double() - r.double()).abs()
            problems.append(f"{name}: {int(bad.sum())}/{r.numel()} elements off, max |diff| {diff.max():.3g}")
    assert not problems, f"{case} differs from MergeKit 0.1.5:\n  " + "\n  ".join(problems)
    assert any(not torch.equal(ours[n], base[n]) for n in ours), f"{case}: the merge left the base unchanged"


def _mergekit_fusion_float32(b: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MergeKit 0.1.5's arcee_fusion importance and threshold, replayed in float32 torch as it runs them."""
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    imp = (x - b).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    srt = imp.reshape(-1).sort().values
    q1, med, q3 = srt[(torch.tensor([0.25, 0.5, 0.75]) * (srt.numel() - 1)).long()]
    return imp, med + 1.5 * (q3 - q1)


@pytest.mark.parametrize("case", [c for c in GOLDEN_CASES if c.startswith("arcee_fusion")])
def test_arcee_fusion_matches_mergekit_but_for_its_float32_kl(tmp_path: Path, case: str) -> None:
    """MergeKit computes kl in float32, where it cancels (p ~ q) to ~1% relative error; we take
    float64. So: (1) MergeKit's output is, element by element, the base or the other model, chosen by
    its float32 formula replayed here but within that formula's own error of the threshold (the golden
    is understood; the replay's last bits depend on the CPU's summation order);
    (2) ours is the float64 reference to 1e-5; (3) the two differ only at the few elements whose
    importance lies within MergeKit's own float32 error of the threshold, and there ours is the
    other model's value and MergeKit's the base's, or the reverse."""
    ours, ref, base, other = _golden_io(case, tmp_path)
    flips_total = 0
    for name, r in ref.items():
        b, x = base[name], other[name]
        imp32, thr32 = _mergekit_fusion_float32(b, x)
        assert bool(((r == b) | (r == x)).all()), f"{name}: MergeKit's output is not one input or the other"
        mk_mask = (r != b) & (x != b)
        # its float32 formula replayed here picks the same elements, but for those whose importance is
        # within float32 kl error (~1%, and summation-order dependent: CPUs' SIMD sum in other orders) of it
        imp64, thr64 = _mergekit_fusion_float32(b.double(), x.double())
        near = (imp64 - thr64).abs() <= 0.02 * abs(float(thr64))
        assert not ((mk_mask != (imp32 >= thr32)) & (x != b) & ~near).any(), \
            f"{name}: MergeKit's output is not its own formula"
        AMBIGUOUS.clear()
        exact = REFERENCES["arcee_fusion"](b.double(), [x.double()], [{}], {})
        assert not (_off(ours[name], exact) & ~AMBIGUOUS["last"]).any(), f"{name}: ours is not the float64 reference"
        ours_mask = ours[name] != b
        flips = _off(ours[name], r)
        assert torch.equal(flips, (ours_mask != mk_mask) & (x != b)), f"{name}: differences beyond the mask"
        # each flip lies within MergeKit's float32 kl error (~1%) of the threshold (its exact error
        # depends on the CPU that summed it, so a bound rather than this machine's replay)
        assert bool(((imp64 - thr64).abs() <= 0.02 * abs(float(thr64)))[flips].all()), f"{name}: a flip far from the threshold"
        flips_total += int(flips.sum())
        assert int(flips.sum()) <= max(2, r.numel() // 200), f"{name}: {int(flips.sum())} flips"
    total = sum(t.numel() for t in ref.values())
    assert flips_total <= total // 500, f"{case}: {flips_total} of {total} elements differ from MergeKit"


# -- constant memory ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["arcee_fusion", "ramplus_tl"])
def test_streams_512mib_tensors_under_1gib(big_inputs: list[Path], tmp_path: Path, method: str) -> None:
    """One 512 MiB bf16 tensor per input, `--memory-budget 128MB`: every pass streams and the
    child's peak RSS stays under 1 GiB (as tests/test_memory_methods.py for ties and sce)."""
    from tests.conftest import write_yaml
    from tests.test_memory import BUDGET, RSS_LIMIT, _run_child

    base, *models = big_inputs
    config = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(p)} for p in models[:1 if method == "arcee_fusion" else 2]]}
    plan = moemerge.plan(config, memory_budget=BUDGET)
    (t,) = plan.tensors
    assert t.rows_per_chunk < t.rows and plan.passes >= 1, "the budget must force streamed passes"
    peak = _run_child("run", write_yaml(tmp_path / "merge.yml", config), tmp_path / "out",
                      "--memory-budget", BUDGET, "--no-progress")
    assert peak < RSS_LIMIT, f"{method}: peak RSS {peak / 2**20:.0f} MiB >= {RSS_LIMIT / 2**20:.0f} MiB"
