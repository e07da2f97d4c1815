"""The merge configuration: MergeKit's YAML schema, validated, plus per-tensor parameter lookup.

A value in `parameters:` is a number/bool/string, a list of numbers (a gradient over layers),
or a list of `{filter: STR, value: V}` rules; `methods.md` ("Parameters") gives the rules.
Parameters are checked here against the `ParamSpec`s each method declares.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Union

import yaml

from moemerge.errors import ConfigError
from moemerge.io.dtypes import parse_dtype_name
from moemerge.names import DcpNames, parse_dcp_names
from moemerge.settings import QUANTIZE_CHOICES

if TYPE_CHECKING:
    from moemerge.methods.base import Method, ParamSpec
    from moemerge.slices_config import SliceSpec
    from moemerge.io.vocab.settings import TokenizerSettings

__all__ = [
    "Scalar",
    "Gradient",
    "FilterRule",
    "ParamValue",
    "ModelSpec",
    "MergeConfig",
    "load_config",
    "read_yaml_documents",
    "parse_config",
    "resolve_value",
    "param_problem",
    "input_models",
    "check_method_config",
    "parse_params",
    "parse_model_ref",
    "scoped_param_problems",
]

Scalar = Union[float, int, bool, str]


@dataclass(frozen=True, slots=True)
class Gradient:
    """A list of numbers interpolated over the layer index (methods.md, "Parameters")."""

    points: tuple[float, ...]

    def at(self, layer: int | None, n_layers: int) -> float:
        """Value at `layer` of `n_layers`; tensors outside numbered layers take the first entry.

        Example: Gradient((0, 1)).at(1, 3) == 0.5; a single-layer model takes the last entry.
        """
        pts = self.points
        if layer is None:
            return pts[0]
        if n_layers <= 1:
            return pts[-1]
        s = layer / (n_layers - 1) * (len(pts) - 1)
        i = min(int(math.floor(s)), len(pts) - 1)
        if i >= len(pts) - 1:
            return pts[-1]
        frac = s - i
        return pts[i] * (1 - frac) + pts[i + 1] * frac


@dataclass(frozen=True, slots=True)
class FilterRule:
    """`{filter: STR, value: V}`: applies to tensors whose name contains `filter` (None: all)."""

    filter: str | None
    value: Scalar | Gradient


ParamValue = Union[Scalar, Gradient, tuple[FilterRule, ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """One entry of `models:`."""

    model: str
    """Location of the checkpoint directory: a path or any fsspec URL."""
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    """Per-model parameters; they take precedence over the top-level `parameters:`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeConfig:
    """A validated merge configuration (MergeKit 0.1.5's schema, minus `slices:`)."""

    merge_method: str
    """Registered method name (see `moemerge.methods.REGISTRY`)."""
    models: tuple[ModelSpec, ...]
    """Inputs in config order (for averages: oldest first)."""
    base_model: str | None = None
    """The base for task-vector methods; copied side files come from it."""
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    """Top-level parameters: defaults for every model and the method's global parameters."""
    dtype: str | None = None
    """Safetensors dtype name the inputs are read as (MergeKit's `dtype`)."""
    out_dtype: str | None = None
    """Safetensors dtype name of the output (default: `dtype`, else the inputs' dtype)."""
    tokenizer_source: str | None = None
    """`base`, `union` or a model location: the output vocabulary (see `tokenizer`); unset:
    embeddings are merged row by row and the base's tokenizer files are copied."""
    tokenizer: TokenizerSettings | None = None
    """How the output vocabulary is built (`tokenizer_source` or the `tokenizer:` block,
    moemerge.io.vocab); None: no vocabulary is built."""
    chat_template: str | None = None
    """`chat_template:`: a template name, `auto` or a Jinja text, written with the tokenizer."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for every location (e.g. an S3 endpoint); never printed."""
    dcp: DcpNames | None = None
    """Which keys of PyTorch DCP inputs are read and how they are renamed (YAML `dcp:` with
    `prefix:` and `rename:`); None: the `model.` keys, prefix stripped. Other inputs ignore it."""
    non_float: Literal["equal", "last"] | None = None
    """Non-float (and `*_extra_state`) tensors: `equal` copies them and requires them equal in
    every input (MergeKit's rule, the default of its methods); `last` copies them from the last
    listed model, the newest snapshot (the default of sma / wma / ema, set by `pma --weights`)."""
    quantize: Literal["none", "like-input", "fp8-block", "mxfp4"] | None = None
    """Output quantization (`--quantize`): `none` writes `out_dtype` and no quantization_config;
    `like-input` the first input's layout (the default when every input is quantized alike);
    `fp8-block` 128x128 block FP8 (DeepSeek-V3); `mxfp4` gpt-oss MXFP4 experts. None: the default."""
    source: dict[str, Any] = field(default_factory=dict)
    """The mapping this config was parsed from, written beside the output."""
    slices: tuple[SliceSpec, ...] = ()
    """MergeKit's `slices:` (or `modules: {default: ...}`), in output order; empty: `models:`
    merges whole models. With slices, `models` lists every model a slice reads (no parameters)."""
    module_parameters: dict[str, ParamValue] = field(default_factory=dict)
    """`modules.default.parameters`: between the slices' parameters and the top level's."""

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the config (storage options left out)."""
        src = {k: v for k, v in self.source.items() if k != "storage_options"}
        blob = json.dumps(src, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def model_locations(self) -> list[str]:
        """Every distinct checkpoint location, base first when it is set."""
        seen: list[str] = []
        for loc in ([self.base_model] if self.base_model else []) + [m.model for m in self.models]:
            if loc not in seen:
                seen.append(loc)
        return seen


_TOP_KEYS = {
    "merge_method", "models", "base_model", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "storage_options", "slices", "tokenizer", "chat_template",
    "name", "modules", "non_float", "dcp", "quantize",
}
_UNSUPPORTED: dict[str, str] = {}


#: A merge config is a few KB; reading stops past this many characters (a huge file is refused
#: before it is parsed).
MAX_CONFIG_CHARS = 1_000_000
#: Nodes of the config once YAML aliases are expanded. Aliases (`*name`) are allowed, but each
#: one repeats its anchor's whole subtree: nine nested levels of nine aliases ("billion
#: laughs") is a 2 KB file expanding to 10**9 values, which ran out of memory after 68 s.
#: Real configs have hundreds of nodes.
MAX_CONFIG_NODES = 100_000


def _check_expansion(doc: Any, path: str) -> None:
    """Refuse a document whose alias-expanded size exceeds MAX_CONFIG_NODES, or that contains
    itself (a recursive alias), before anything walks it. Linear in the distinct nodes: the
    expanded size of a shared node is computed once."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{path}: a YAML alias refers to a node containing itself (recursive "
                              "alias); write the value out")
        active.add(key)
        kids = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        total = 1
        for k in kids:
            total += size(k)
            if total > MAX_CONFIG_NODES:
                raise ConfigError(
                    f"{path}: YAML aliases expand this config to more than {MAX_CONFIG_NODES:,} "
                    "values (an alias bomb?); a merge config has hundreds: write the values out")
        active.discard(key)
        sizes[key] = total
        return total

    size(doc)


def read_yaml_documents(path: str, *, storage_options: dict[str, Any] | None = None) -> list[Any]:
    """The YAML documents of the file at `path` (a path or fsspec URL), each checked against
    alias bombs; at most MAX_CONFIG_CHARS characters are read. Errors name the file."""
    import fsspec

    try:
        with fsspec.open(path, "rt", **(storage_options or {})) as f:
            text = f.read(MAX_CONFIG_CHARS + 1)
        if len(text) > MAX_CONFIG_CHARS:
            raise ConfigError(f"{path}: is larger than {MAX_CONFIG_CHARS:,} characters; a merge config "
                              "is a few KB: is this the right file?")
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file does not exist") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}); save the config as UTF-8 YAML") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from e
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        # PyYAML's own message spans several lines (it quotes the source); keep one line
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at} ({what})") from e
    except RecursionError as e:  # thousands of nested brackets
        raise ConfigError(f"{path}: YAML nested too deeply to read; a merge config is a few levels deep") from e
    for doc in docs:
        _check_expansion(doc, path)
    return docs or [None]


def load_config(path: str, *, storage_options: dict[str, Any] | None = None) -> MergeConfig:
    """Read and validate a YAML config from a path or fsspec URL."""
    docs = read_yaml_documents(path, storage_options=storage_options)
    if len(docs) != 1:
        raise ConfigError(f"{path}: holds {len(docs)} YAML documents (separated by `---`); `moemerge run` takes "
                          "one merge: run several named merges with `moemerge multi` (MergeKit's mergekit-multi)")
    doc = docs[0]
    try:
        return parse_config(doc, where=path)
    except ConfigError as e:
        if e.message.startswith(f"{path}:"):
            raise
        # name the file in every config error (key-level messages name only the key)
        raise ConfigError(f"{path}: {e.message}") from e


def _as_number(v: Any) -> Any:
    """A string that `float()` reads as a finite number -> that float; anything else unchanged.
    YAML 1.1 reads `1e-2` (no dot) as a string, and MergeKit accepts `"0.3"`; both are numbers."""
    if isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            return v
        if math.isfinite(x):  # "nan" and "inf" stay strings (and are refused as such where a number is due)
            return x
    return v


def _parse_value(v: Any, key: str) -> ParamValue:
    v = [_as_number(x) for x in v] if isinstance(v, list) else _as_number(v)
    if isinstance(v, bool | int | float | str):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"parameter `{key}`: {v} is not a finite number")
        return v
    if isinstance(v, list) and v and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        if not all(math.isfinite(x) for x in v):
            raise ConfigError(f"parameter `{key}`: gradient {v} has a non-finite entry")
        return Gradient(tuple(float(x) for x in v))
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        rules = []
        for x in v:
            extra = set(x) - {"filter", "value"}
            if extra or "value" not in x:
                raise ConfigError(
                    f"parameter `{key}`: each list entry must be {{filter: STR, value: V}}, got {x}"
                )
            inner = _parse_value(x["value"], key)
            if isinstance(inner, tuple):
                raise ConfigError(f"parameter `{key}`: a filter's value cannot be another filter list")
            filt = x.get("filter")
            rules.append(FilterRule(None if filt is None else str(filt), inner))
        return tuple(rules)
    raise ConfigError(
        f"parameter `{key}`: expected a number, a list of numbers (a layer gradient) or a list "
        f"of {{filter: ..., value: ...}} entries, got {v!r}"
    )


def parse_params(doc: Any, where: str) -> dict[str, ParamValue]:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: `parameters` must be a mapping of name -> value, got {doc!r}")
    return {str(k): _parse_value(v, f"{where}.{k}" if where else str(k)) for k, v in doc.items()}


def parse_model_ref(v: Any, key: str) -> str:
    """A model reference (path, URL, Hub id, `@revision`, `+adapter`) as the location opened."""
    from moemerge.io.hub import model_reference

    return model_reference(v, key)


def _parse_dtype(v: Any, key: str) -> str | None:
    if v is None:
        return None
    name = parse_dtype_name(str(v))
    if name is None:
        raise ConfigError(
            f"`{key}`: unknown dtype {v!r}; use float32, float16, bfloat16 or float64"
        )
    return name


def _parse_non_float(value: Any, where: str) -> Literal["equal", "last"] | None:
    if value is None:
        return None
    if value == "equal" or value == "last":
        return "equal" if value == "equal" else "last"
    raise ConfigError(f"{where}: `non_float` must be 'equal' (copy, must match in every input) or "
                      f"'last' (copy from the last listed model), got {value!r}")


def _parse_quantize(value: Any, out_dtype: Any, where: str) -> Any:
    """`quantize:` checked; an FP8 `out_dtype` without it is refused (FP8 needs scales)."""
    if value is not None and value not in QUANTIZE_CHOICES:
        raise ConfigError(f"{where}: `quantize` must be one of {', '.join(QUANTIZE_CHOICES)}, got {value!r}")
    name = None if out_dtype is None else parse_dtype_name(str(out_dtype))
    if name is not None and name.startswith("F8"):
        # unscaled FP8 weights (norms and embeddings included) load but give a broken model
        raise ConfigError(
            f"{where}: `out_dtype: {out_dtype}` would write every tensor as FP8 without scales; "
            "use --quantize fp8-block (YAML `quantize: fp8-block`) for block-scaled FP8, or "
            "--quantize like-input for the inputs' layout, with out_dtype bfloat16 or unset")
    return value


def parse_config(doc: Any, *, where: str = "config") -> MergeConfig:
    """Validate a YAML mapping (MergeKit schema) and build a MergeConfig.

    Checks structure and parameter names/values against the method's declared parameters.
    """
    from moemerge.methods import get_method  # the registry knows each method's parameters

    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a YAML mapping with `merge_method` and `models`")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(f'`{k}`' for k in unknown)}; "
            f"valid keys: {', '.join(sorted(_TOP_KEYS - set(_UNSUPPORTED)))}"
        )
    for key, msg in _UNSUPPORTED.items():
        if doc.get(key) is not None:
            raise ConfigError(f"{where}: {msg}")
    if "merge_method" not in doc:
        raise ConfigError(f"{where}: missing required key `merge_method`")
    method = get_method(str(doc["merge_method"]))  # raises, listing valid names
    sliced = None
    if doc.get("slices") is not None or doc.get("modules") is not None:  # layer ranges (slices_config.py)
        from moemerge.slices_config import parse_slices

        b = doc.get("base_model")
        sliced = parse_slices(doc, None if b is None or method.base == "none" else parse_model_ref(b, "base_model"))
    models_doc = doc.get("models") if sliced is None else [{"model": m} for m in sliced.models]
    if not isinstance(models_doc, list) or not models_doc:
        raise ConfigError(f"{where}: `models` must be a non-empty list of {{model: PATH}} entries")
    models = []
    for i, m in enumerate(models_doc):
        key = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"{where}: `{key}` must be a mapping with a `model` key, got {m!r}")
        extra = sorted(set(m) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"{where}: `{key}` has unknown key(s) {extra}; allowed: model, parameters")
        models.append(
            ModelSpec(
                model=parse_model_ref(m["model"], f"{key}.model"),
                parameters=parse_params(m.get("parameters"), f"{key}.parameters"),
            )
        )
    base = doc.get("base_model")
    storage_options = doc.get("storage_options") or {}
    if not isinstance(storage_options, dict):
        raise ConfigError(f"{where}: `storage_options` must be a mapping")
    tok = doc.get("tokenizer_source")
    if tok is not None and not isinstance(tok, str):
        raise ConfigError(f"{where}: `tokenizer_source` must be 'base' or a model location")
    from moemerge.io.vocab.settings import parse_chat_template, parse_tokenizer_settings

    tok_settings = parse_tokenizer_settings(doc, where, parse_model_ref)
    cfg = MergeConfig(
        merge_method=method.name,
        models=tuple(models),
        base_model=None if base is None else parse_model_ref(base, "base_model"),
        parameters=parse_params(doc.get("parameters"), "parameters"),
        dtype=_parse_dtype(doc.get("dtype"), "dtype"),
        out_dtype=_parse_dtype(doc.get("out_dtype"), "out_dtype"),
        # a model location made explicit as every model reference (a Hub id -> hf://...)
        tokenizer_source=tok if tok in (None, "base", "union") else parse_model_ref(tok, "tokenizer_source"),
        tokenizer=tok_settings,
        chat_template=parse_chat_template(doc.get("chat_template"), where),
        non_float=_parse_non_float(doc.get("non_float"), where),
        quantize=_parse_quantize(doc.get("quantize"), doc.get("out_dtype"), where),
        storage_options=dict(storage_options),
        dcp=None if doc.get("dcp") is None else parse_dcp_names(doc["dcp"], where="dcp"),
        source=dict(doc),
        slices=sliced.slices if sliced else (),
        module_parameters=sliced.module_parameters if sliced else {},
    )
    if sliced is not None:
        from moemerge.slices_config import check_slices_config

        check_slices_config(cfg, method)
    else:
        check_method_config(cfg, method)
    return cfg


def param_problem(spec: ParamSpec, v: Any) -> str | None:
    """What is wrong with one value of parameter `spec` (e.g. 'must be in [0, 1]'), or None."""
    if spec.kind == "bool":
        return None if isinstance(v, bool) or v in (0, 1) else "must be true or false"
    if isinstance(v, str) or isinstance(v, bool):
        return f"must be a number in {spec.range}"
    x = float(v)
    if not math.isfinite(x):
        return "must be a finite number"
    if spec.kind == "int" and x != int(x):
        return f"must be an integer in {spec.range}"
    if x not in spec.range:
        return f"must be in {spec.range}"
    return None


def input_models(cfg: MergeConfig, method: Method) -> list[int]:
    """Indices into cfg.models of the inputs of `method` (the base excluded for base methods)."""
    if method.base == "none":
        return list(range(len(cfg.models)))
    return [i for i, m in enumerate(cfg.models) if m.model != cfg.base_model]


def _written_values(v: ParamValue, path: str) -> list[tuple[Scalar, str, str]]:
    """(value, where in the config, which tensors it applies to) of every written value."""
    if isinstance(v, Gradient):
        pts = ", ".join(f"{x:g}" for x in v.points)
        return [(x, f"{path}[{j}]", f"layer gradient [{pts}], entry {j}") for j, x in enumerate(v.points)]
    if isinstance(v, tuple):
        out: list[tuple[Scalar, str, str]] = []
        for j, rule in enumerate(v):
            scope = "tensors without a rule above" if rule.filter is None else f"tensors matching {rule.filter!r}"
            for x, at, what in _written_values(rule.value, f"{path}[{j}].value"):
                out.append((x, at, scope if what == "every tensor" else f"{scope}, {what}"))
        return out
    return [(v, path, "every tensor")]


def scoped_param_problems(method: Method, where: str, params: Mapping[str, ParamValue], scope_ok: set[str],
                    model: str | None) -> list[str]:
    """Unknown names, misplaced global parameters and out-of-range values of one `parameters:`."""
    problems: list[str] = []
    known = {p.name for p in method.params} | set(method.ignored_params)
    for key, v in params.items():
        if key not in known:
            problems.append(
                f"`{where}.{key}`: unknown parameter for {method.name}; "
                f"valid: {', '.join(sorted(known)) or '(none)'}"
            )
            continue
        spec = method.spec(key)
        if spec is None:
            continue
        if spec.scope not in scope_ok:
            problems.append(f"`{where}.{key}`: {key} is a global parameter; set it under top-level `parameters`")
        whose = f"model {model}" if model else ("every model" if spec.scope == "model" else "the merge")
        for x, at, applies in _written_values(v, f"{where}.{key}"):
            msg = param_problem(spec, x)
            if msg:
                problems.append(f"`{at}`: {method.name} parameter `{key}` is {x!r} for {whose} "
                                f"({applies}); {key} {msg}")
    return problems


def check_method_config(cfg: MergeConfig, method: Method) -> None:
    """Check parameter names, values and the input contract of `cfg` for `method`; every
    problem is listed in one ConfigError."""
    problems = scoped_param_problems(method, "parameters", cfg.parameters, {"model", "global"}, None)
    for i, m in enumerate(cfg.models):
        problems += scoped_param_problems(method, f"models[{i}].parameters", m.parameters, {"model"}, m.model)
    if method.base == "required" and not cfg.base_model:
        problems.append(f"`base_model`: {method.name} needs a base model (task vectors are taken against it)")
    n = len(input_models(cfg, method))
    besides = " besides base_model" if method.base != "none" else ""
    if n < method.min_inputs:
        problems.append(f"`models`: {method.name} needs at least {method.min_inputs} model(s){besides}, got {n}")
    if method.max_inputs is not None and n > method.max_inputs:
        problems.append(f"`models`: {method.name} takes at most {method.max_inputs} model(s){besides}, got {n}")
    for spec in method.params:
        if spec.default is not None or spec.scope != "model":
            continue
        for i, m in enumerate(cfg.models):
            if m.model == cfg.base_model and method.base != "none":
                continue
            if spec.name not in m.parameters and spec.name not in cfg.parameters:
                problems.append(
                    f"`models[{i}].parameters.{spec.name}`: required by {method.name} "
                    f"for {m.model} (or set it under top-level `parameters`)"
                )
    for spec in method.params:
        if spec.default is None and spec.scope == "global" and spec.name not in cfg.parameters:
            problems.append(f"`parameters.{spec.name}`: required by {method.name}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0])


def resolve_value(value: ParamValue, tensor: str, layer: int | None, n_layers: int) -> Scalar | None:
    """The value of one parameter for one tensor; None when no filter rule matches."""
    if isinstance(value, tuple):
        for rule in value:
            if rule.filter is None or rule.filter in tensor:
                return resolve_value(rule.value, tensor, layer, n_layers)
        return None
    if isinstance(value, Gradient):
        return value.at(layer, n_layers)
    return value
