"""`model+adapter`: a checkpoint view that serves each LoRA-targeted weight with the adapter's
low-rank delta added as it is read (W + scale * B @ A, PEFT's meaning), no merged copy on disk.

A read of rows r0..r1 of W reads those rows of W and of B and all of A (A is r x in: small),
and adds the delta band by band in float64, rounding once to W's dtype; the extra memory is a
band and A per reading thread. The adapter is checked whole when it is opened, before any
work: its kind (plain LoRA only), every tensor's role, name and shape against the model.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moemerge.errors import CheckpointError
from moemerge.io import storage
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.hub import ADAPTER_CONFIG
from moemerge.io.limits import MAX_JSON_BYTES, read_limited

if TYPE_CHECKING:
    import torch

__all__ = ["LoraTarget", "LoraView", "open_lora", "ADAPTER_WEIGHTS", "BAND_BYTES"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: float64 bytes of one band of a weight (its rows rounded down, at least one row).
BAND_BYTES = 4 << 20
#: PEFT's saved key: `base_model.model.<module>.lora_A.weight` (an adapter name such as
#: `.default` may sit before `.weight` in files saved by hand).
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                  r"(?P<rest>(?:\.[A-Za-z0-9_-]+){0,2})")


#: A whole base weight saved with the adapter (PEFT's `save_embedding_layers`): loading the
#: adapter puts it in place of the model's, so it is served instead of the model's weight.
_BASE_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.base_layer\.weight")


def _key_ok(m: re.Match[str]) -> bool:
    """`.weight` (or `.<adapter>.weight`) after lora_A/B; nothing (or `.<adapter>`) after the
    embedding matrices, which PEFT stores as bare parameters."""
    rest = m.group("rest").split(".")[1:]
    if m.group("kind").startswith("lora_embedding"):
        return len(rest) == 0 or (len(rest) == 1 and rest[0] != "weight")
    return rest[-1:] == ["weight"]
_FLOATS = {"F64", "F32", "F16", "BF16"}
#: adapter_config.json keys of adapter kinds whose effect is not W + scale * B @ A; each is
#: refused when set (a silently ignored one would give other weights than the adapter's).
_REFUSED = {
    "use_dora": "DoRA (`use_dora: true`) rescales each weight's columns",
    "modules_to_save": "`modules_to_save` stores whole replacement modules",
    "alpha_pattern": "`alpha_pattern` gives some modules their own alpha",
    "layer_replication": "`layer_replication` duplicates layers",
    "lora_bias": "`lora_bias` adds a bias to lora_B",
    "target_parameters": "`target_parameters` (LoRA on raw parameters, e.g. fused experts)",
    "trainable_token_indices": "`trainable_token_indices` stores replacement token rows",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraTarget:
    """One weight the adapter changes, and how."""

    weight: str
    """The model's tensor (`<module>.weight`)."""
    a: str
    """The adapter's A tensor (r x in)."""
    b: str
    """The adapter's B tensor (out x r)."""
    rank: int
    scale: float
    """lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`)."""
    transposed: bool
    """W is stored (in, out), so the delta is (B @ A)^T: `fan_in_fan_out` (GPT-2's Conv1D)
    and embedding LoRA (`lora_embedding_A/B`)."""


def _config(adapter_url: str, fs: Any, root: str) -> dict[str, Any]:
    where = f"{adapter_url.rstrip('/')}/{ADAPTER_CONFIG}"
    raw = storage.with_retries(lambda: read_limited(fs, storage.join(root, ADAPTER_CONFIG), where=where,
                                                    limit=MAX_JSON_BYTES, what=ADAPTER_CONFIG),
                               what=f"read {ADAPTER_CONFIG}", url=adapter_url)
    if raw is None:
        raise CheckpointError(f"{where}: does not exist; a LoRA adapter is a PEFT directory "
                              f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise CheckpointError(f"{where}: a {kind} adapter; moemerge adds LoRA adapters only (peft_type LORA)")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise CheckpointError(f"{where}: {what}; moemerge adds plain LoRA deltas only. Merge this adapter "
                                  "into its model with PEFT (`merge_and_unload`) and list the merged model")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise CheckpointError(f"{where}: `{key}` must be a positive number, got {v!r}")
    return cfg


def _targets(url: str, adapter: Checkpoint, base: Checkpoint,
             cfg: dict[str, Any]) -> tuple[dict[str, LoraTarget], dict[str, str]]:
    """Every adapted weight, and every weight the adapter replaces whole (model name ->
    adapter name), checked against the model: all problems in one error."""
    where = f"{adapter.url}"
    pairs: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    replaced: dict[str, str] = {}
    for key in sorted(adapter.tensors):
        r = _BASE_KEY.fullmatch(key)
        if r is not None:
            weight, t = f"{r.group('module')}.weight", adapter.tensors[key]
            w = base.tensors.get(weight)
            if w is None or (w.shape, w.dtype) != (t.shape, t.dtype):
                got = "absent" if w is None else f"{w.dtype} {list(w.shape)}"
                problems.append(f"tensor `{key}`: a whole {t.dtype} {list(t.shape)} weight for `{weight}`, "
                                f"which in the model is {got}")
            replaced[weight] = key
            continue
        m = _KEY.fullmatch(key)
        if m is None or not _key_ok(m):
            what = ("a DoRA magnitude" if "lora_magnitude_vector" in key else
                    "a whole module (modules_to_save?)" if "modules_to_save" in key else "not a LoRA A/B matrix")
            problems.append(f"tensor `{key}`: {what}")
            continue
        kind = m.group("kind")
        slot = pairs.setdefault(m.group("module"), {})
        role = kind[-1]  # A or B
        if role in slot:
            problems.append(f"tensor `{key}`: a second lora_{role} for module `{m.group('module')}`")
        slot[role] = key
        slot["embedding"] = "1" if kind.startswith("lora_embedding") else slot.get("embedding", "")
    ranked = bool(cfg.get("rank_pattern"))
    r_cfg, alpha = cfg["r"], float(cfg["lora_alpha"])
    fan = bool(cfg.get("fan_in_fan_out"))
    out: dict[str, LoraTarget] = {}
    for module, slot in sorted(pairs.items()):
        if "A" not in slot or "B" not in slot:
            problems.append(f"module `{module}`: has lora_{'A' if 'A' in slot else 'B'} without "
                            f"lora_{'B' if 'A' in slot else 'A'}")
            continue
        weight = f"{module}.weight"
        w = base.tensors.get(weight)
        if w is None:
            problems.append(f"module `{module}`: the model has no tensor `{weight}` (an adapter for another "
                            "architecture, or for another model?)")
            continue
        a, b = adapter.tensors[slot["A"]], adapter.tensors[slot["B"]]
        transposed = fan or bool(slot["embedding"])
        bad = [f"`{t.name}` is {t.dtype}" for t in (a, b, w) if t.dtype not in _FLOATS]
        if bad:
            problems.append(f"module `{module}`: {', '.join(bad)}; LoRA needs floating-point tensors")
            continue
        if len(a.shape) != 2 or len(b.shape) != 2 or len(w.shape) != 2:
            problems.append(f"module `{module}`: A {list(a.shape)}, B {list(b.shape)} and the weight "
                            f"{list(w.shape)} must all be matrices")
            continue
        rank, n_in = a.shape
        n_out, rank_b = b.shape
        want = (n_in, n_out) if transposed else (n_out, n_in)
        if rank_b != rank or tuple(w.shape) != want or rank == 0:
            lay = "(in, out)" if transposed else "(out, in)"
            problems.append(f"module `{module}`: A is {list(a.shape)} (r x in), B is {list(b.shape)} (out x r), "
                            f"so the weight should be {list(want)} {lay}; the model's `{weight}` is {list(w.shape)}")
            continue
        if not ranked and rank != r_cfg:
            problems.append(f"module `{module}`: rank {rank}, but adapter_config.json says r = {r_cfg}")
            continue
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        out[weight] = LoraTarget(weight=weight, a=slot["A"], b=slot["B"], rank=rank, scale=scale,
                                 transposed=transposed)
    if not problems and not out:
        problems.append("holds no LoRA tensors")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise CheckpointError(f"{url}: the LoRA adapter {where} does not fit the model:\n  " + "\n  ".join(shown))
    return out, replaced


def open_lora(url: str, model: str, adapter_url: str, storage_options: dict[str, Any] | None,
              open_model: Any) -> LoraView:
    """The model at `model` (opened with `open_model(model)`) seen through the adapter at
    `adapter_url`; `url` is the whole `model+adapter` reference, the view's name."""
    fs, root = storage.resolve(adapter_url, storage_options)
    root = root.rstrip("/") or root
    cfg = _config(adapter_url, fs, root)
    weights = storage.join(root, ADAPTER_WEIGHTS)
    if not storage.with_retries(lambda: fs.isfile(weights), what=f"look up {ADAPTER_WEIGHTS}", url=adapter_url):
        other = " (adapter_model.bin is a pickle: save the adapter with safe_serialization)" if \
            fs.isfile(storage.join(root, "adapter_model.bin")) else ""
        raise CheckpointError(f"{adapter_url.rstrip('/')}/{ADAPTER_WEIGHTS}: does not exist{other}")
    adapter = Checkpoint.open_file(f"{adapter_url.rstrip('/')}/{ADAPTER_WEIGHTS}", fs, weights)
    try:
        base: Checkpoint = open_model(model)
    except BaseException:
        adapter.close()
        raise
    try:
        if (base.config() or {}).get("quantization_config") or getattr(base, "quantized", None):
            raise CheckpointError(f"{url}: the model is stored quantized; a LoRA adapter is added to plain "
                                  "weights only. Use a bf16/fp16/fp32 copy of the model")
        targets, replaced = _targets(url, adapter, base, cfg)
        return LoraView(url, base, adapter, targets, replaced, adapter_url=adapter_url, adapter_root=root)
    except BaseException:
        adapter.close()
        base.close()
        raise


class LoraView(Checkpoint):
    """A checkpoint whose LoRA-targeted weights are served with the delta added; everything
    else as is. A wrapper (io.formats.WrapsReader over `inner`): it owns `inner` and the adapter."""

    def __init__(self, url: str, inner: Checkpoint, adapter: Checkpoint, targets: dict[str, LoraTarget],
                 replaced: dict[str, str] | None = None, *, adapter_url: str, adapter_root: str) -> None:
        super().__init__(url, inner.fs, inner.root, dict(inner.tensors), inner.files)
        self.header_digests = inner.header_digests
        self.inner = inner
        self.adapter = adapter
        self.targets = targets
        self.replaced = dict(replaced or {})
        """Model tensor -> the adapter's whole copy served in its place (`base_layer.weight`)."""
        self.adapter_url = adapter_url
        self._adapter_root = adapter_root
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"LoraView({self.inner!r}, adapter={self.adapter_url!r}, weights={len(self.targets)})"

    def identity_files(self) -> list[tuple[str, Any, str, str | None]]:
        """(shown name, filesystem, path, header sha256) of the adapter's files, for io.identity."""
        a = self.adapter_url.rstrip("/")
        return [(f"{a}/{ADAPTER_CONFIG}", self.adapter.fs, storage.join(self._adapter_root, ADAPTER_CONFIG), None),
                (f"{a}/{ADAPTER_WEIGHTS}", self.adapter.fs, storage.join(self._adapter_root, ADAPTER_WEIGHTS),
                 self.adapter.header_digests.get(ADAPTER_WEIGHTS))]

    def side_file(self, name: str) -> bytes | None:
        return self.inner.side_file(name)

    def config(self) -> dict[str, Any] | None:
        return self.inner.config()

    def _matrix(self, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """Rows r0..r1 (all: None) of adapter tensor `name`, as float64."""
        import torch

        from moemerge.io.dtypes import to_torch

        t = self.adapter.tensors[name]
        a, b = (0, t.rows) if r0 is None or r1 is None else (r0, r1)
        buf = bytearray((b - a) * t.row_bytes)
        if buf:
            self.adapter.read_rows(name, a, b, memoryview(buf))
        return torch.frombuffer(buf, dtype=to_torch(t.dtype)).view(b - a, t.row_len).to(torch.float64) \
            if buf else torch.zeros(b - a, t.row_len, dtype=torch.float64)

    def _a(self, target: LoraTarget) -> torch.Tensor:
        """All of A (float64), kept per thread for the weight last read."""
        got = getattr(self._local, "a", None)
        if got is None or got[0] != target.a:
            got = self._local.a = (target.a, self._matrix(target.a))
        a: torch.Tensor = got[1]
        return a

    def _b_all(self, target: LoraTarget) -> torch.Tensor:
        got = getattr(self._local, "b", None)
        if got is None or got[0] != target.b:
            got = self._local.b = (target.b, self._matrix(target.b))
        b: torch.Tensor = got[1]
        return b

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None:
        whole = self.replaced.get(name)
        if whole is not None:
            self.adapter.read_rows(whole, r0, r1, out)
        else:
            self.inner.read_rows(name, r0, r1, out)
        t = self.targets.get(name)
        if t is None or r1 <= r0:
            return
        import torch

        from moemerge.io.dtypes import to_torch

        info = self.tensors[name]
        n_in = info.row_len
        dt = to_torch(info.dtype)
        w = torch.frombuffer(out, dtype=dt, count=(r1 - r0) * n_in).view(r1 - r0, n_in)
        a_all = self._a(t)  # r x in (in = this weight's columns, or its rows when transposed)
        band = max(1, BAND_BYTES // max(1, n_in * 8))
        for a in range(r0, r1, band):
            b = min(r1, a + band)
            if t.transposed:  # W is (in, out): rows a..b of (B @ A)^T are A[:, a:b]^T @ B^T
                delta = a_all[:, a:b].T @ self._b_all(t).T
            else:  # W is (out, in): rows a..b of B @ A are B[a:b] @ A
                delta = self._matrix(t.b, a, b) @ a_all
            rows = w[a - r0:b - r0]
            rows.copy_((rows.to(torch.float64) + t.scale * delta).to(dt))

    def close(self) -> None:
        self.adapter.close()
        self.inner.close()
