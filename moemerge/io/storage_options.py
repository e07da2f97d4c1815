"""Check `storage_options` before any filesystem is built: a wrong type or an unknown option is
one ConfigError naming the option, not a traceback from deep inside s3fs at the first request."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from moemerge.errors import ConfigError

__all__ = ["check_storage_options", "S3_OPTIONS"]

#: s3fs 2024+ `S3FileSystem` options and the type each must have. `profile` reaches
#: aiobotocore's session through s3fs's **kwargs; the last four are fsspec's own. Any other key
#: would be handed to the session at the first request and fail there (or silently do nothing).
S3_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "anon": bool, "endpoint_url": str, "key": str, "secret": str, "token": str,
    "username": str, "password": str, "profile": str, "use_ssl": bool, "requester_pays": bool,
    "client_kwargs": dict, "config_kwargs": dict, "s3_additional_kwargs": dict,
    "default_block_size": int, "default_fill_cache": bool, "default_cache_type": str,
    "version_aware": bool, "cache_regions": bool, "max_concurrency": int,
    "fixed_upload_size": bool, "local_expiry_check": bool,
    "use_listings_cache": bool, "listings_expiry_time": (int, float), "max_paths": int,
    "skip_instance_cache": bool,
}
_TYPE_NAMES = {bool: "true or false", str: "a string", dict: "a mapping", int: "an integer"}

_checked: set[str] = set()


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return "a number"
    return _TYPE_NAMES.get(t, t.__name__)


def _protocol(url: str) -> str:
    head, sep, _ = str(url).partition("://")
    return head.lower() if sep else "file"


def check_storage_options(url: str, options: Mapping[str, Any] | None) -> None:
    """Raise a one-line ConfigError if `options` cannot be meant for `url`'s filesystem.

    S3 options are checked by name and type (`S3_OPTIONS`); for other filesystems `storage.resolve`
    turns a TypeError/ValueError from building the filesystem into a ConfigError. Values are
    never printed (they may be credentials).
    """
    if not options:
        return
    if not isinstance(options, Mapping):
        raise ConfigError(f"`storage_options` must be a mapping of option -> value, got {type(options).__name__}")
    proto = _protocol(url)
    try:
        memo = proto + json.dumps(options, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        memo = ""
    if memo and memo in _checked:
        return
    for key in options:
        if not isinstance(key, str):
            raise ConfigError(f"`storage_options`: option names must be strings, got {key!r}")
    if proto in ("s3", "s3a"):
        unknown = sorted(set(options) - set(S3_OPTIONS))
        if unknown:
            raise ConfigError(
                f"`storage_options.{unknown[0]}`: not an option of s3:// storage (s3fs); valid options: "
                f"{', '.join(sorted(S3_OPTIONS))}"
            )
        for key, want in S3_OPTIONS.items():
            if key not in options or options[key] is None:
                continue
            v = options[key]
            ok = isinstance(v, want) and not (want in (int, (int, float)) and isinstance(v, bool))
            if not ok:
                raise ConfigError(f"`storage_options.{key}`: must be {_type_name(want)}, got a "
                                  f"{type(v).__name__}; see the s3fs documentation of S3FileSystem")
        _check_botocore(options)
    if memo:
        _checked.add(memo)


#: Arguments of botocore's `create_client` that s3fs does not set itself (`client_kwargs`).
_CLIENT_KWARGS = {"region_name", "api_version", "use_ssl", "verify", "endpoint_url", "aws_access_key_id",
                  "aws_secret_access_key", "aws_session_token", "aws_account_id"}


def _check_botocore(options: Mapping[str, Any]) -> None:
    """`client_kwargs` and `config_kwargs` go to botocore at the first request: check them now."""
    client = options.get("client_kwargs") or {}
    unknown = sorted(set(map(str, client)) - _CLIENT_KWARGS)
    if unknown:
        raise ConfigError(f"`storage_options.client_kwargs.{unknown[0]}`: not an argument of botocore's "
                          f"create_client; valid: {', '.join(sorted(_CLIENT_KWARGS))}")
    config = options.get("config_kwargs")
    if config:
        from botocore.config import Config

        try:
            Config(**config)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"`storage_options.config_kwargs`: not accepted by botocore's Config "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
