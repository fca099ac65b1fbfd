"""Every environment variable modelbuild decides anything by, read here and only here.

``current()`` reads ``os.environ`` into a read-only ``Settings`` (``read(mapping)`` any mapping:
tests pass a dict). Nothing caches it: each call reads again (a few dict lookups), so a process
sees its own environment: the doit driver when it loads the targets (graph_cache.load, which
rejects a bad value before anything runs), a pass's worker process the one its parent set.
A value that is empty (or only spaces) is unset, except ``MODELBUILD_GPUS`` where it means no GPU.
Booleans: 1/true/yes/on, 0/false/no/off (any case); anything else, or a bad number, is one line.
Every variable, its type, default and the TOML key it overrides: docs/settings.md. Credentials
(AWS_*) are not read here: remote.py hands them to the S3 client, never into an object. The
signing key is a path here (MODELBUILD_SIGNING_KEY); its bytes are read only by signing.py.
"""

from __future__ import annotations

import os
import re

from .. import UserError
from .numerics import BRANCHES, NATIVE

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
DOWNLOAD_MODES = ("all", "toplevel")
EXECUTOR_KINDS = ("local", "ray")
BUCKET_RE = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"  # compiled on first use (re's cache)


def _bad(name: str, text: str, expected: str) -> UserError:
    return UserError(f"environment: {name}={text[:60]!r}: expected {expected}")


def parse_bool(name: str, text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE:
        return True
    if word in FALSE:
        return False
    raise _bad(name, text, "1/true/yes/on or 0/false/no/off")


def _number(name: str, text: str, kind: type, positive: bool, expected: str):
    try:
        value = kind(text.strip())
    except ValueError:
        raise _bad(name, text, expected) from None
    if not (value > 0 if positive else value >= 0) or value == float("inf"):  # nan fails both
        raise _bad(name, text, expected)
    return value


def _positive_int(name, text):
    return _number(name, text, int, True, "a positive integer")


def _positive_float(name, text):
    return _number(name, text, float, True, "a positive number")


def _count(name, text):
    return _number(name, text, int, False, "an integer >= 0")


def _choice(options):
    def parse(name, text):
        word = text.strip().lower()
        if word not in options:
            raise _bad(name, text, f"one of {', '.join(options)}")
        return word
    return parse


def _gpus(name, text):
    word = text.strip().lower()
    if word in ("", "none"):
        return ()
    try:
        return tuple(int(i) for i in word.split(","))
    except ValueError:
        raise _bad(name, text, "GPU indices such as 0,1 (or none)") from None


def _numerics(name, text):
    return _choice((*BRANCHES, NATIVE))(name, text)


def _remote(name, text):
    if text.strip().lower() == "off":
        return "off"
    return check_remote_url(text.strip(), name)  # its message never echoes a URL that names credentials


def _text(name, text):
    return text


def _path(name, text):
    return text.strip()


def _paths(name, text):
    """PATH[,PATH...]: empty items are refused (a stray comma would silently trust nothing more)."""
    items = tuple(item.strip() for item in text.split(","))
    if not all(items):
        raise _bad(name, text, "PATH[,PATH...] of .pub files")
    return items


def check_remote_url(value: object, where: str) -> str:
    """An ``s3://bucket[/prefix]`` URL; anything else is one line (a URL carrying credentials or
    an endpoint is refused without echoing it: those come from the AWS chain only)."""
    if not isinstance(value, str):
        raise UserError(f"{where}: expected a string s3://bucket[/prefix], got {type(value).__name__}")
    scheme, sep, rest = value.partition("://")
    bucket = rest.split("/", 1)[0]
    if "@" in bucket or ":" in bucket:
        raise UserError(f"{where}: the URL names credentials or an endpoint; give s3://bucket[/prefix] and set "
                        "the endpoint and keys in the AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) "
                        "or a profile")
    if scheme != "s3" or not sep or not re.match(BUCKET_RE, bucket) or "?" in rest or "#" in rest or "//" in rest:
        raise UserError(f"{where}: {value[:100]!r} is not s3://bucket[/prefix] (bucket: 3-63 lowercase letters, "
                        "digits, '.' and '-')")
    return value.rstrip("/")


def check_download_mode(value: object, where: str) -> str:
    """``[cache] download`` or MODELBUILD_DOWNLOAD: one of DOWNLOAD_MODES (download.py)."""
    if value not in DOWNLOAD_MODES:
        raise UserError(f"{where}: expected one of {', '.join(DOWNLOAD_MODES)}, got {value!r}")
    return value


# variable -> (Settings field, parser, value when unset); docs/settings.md describes each
VARIABLES = {
    "MODELBUILD_CACHE": ("cache", _text, None),
    "MODELBUILD_FORCE": ("force", parse_bool, False),
    "MODELBUILD_DOWNLOAD": ("download", _choice(DOWNLOAD_MODES), None),
    "MODELBUILD_GRAPH_CACHE": ("graph_cache", parse_bool, True),
    "MODELBUILD_VERBOSE": ("verbose", parse_bool, False),
    "MODELBUILD_REMOTE_CACHE": ("remote_cache", _remote, None),
    "MODELBUILD_REMOTE_PUSH": ("remote_push", parse_bool, None),
    "MODELBUILD_REMOTE_REQUIRED": ("remote_required", parse_bool, None),
    "MODELBUILD_SIGNING_KEY": ("signing_key", _path, None),
    "MODELBUILD_TRUSTED_KEYS": ("trusted_keys", _paths, None),
    "MODELBUILD_EXECUTOR": ("executor", _choice(EXECUTOR_KINDS), None),
    "MODELBUILD_GPUS": ("gpus", _gpus, None),
    "MODELBUILD_GPU_MEMORY_GB": ("gpu_memory_gb", _positive_float, None),
    "MODELBUILD_SIMULATED_GPUS": ("simulated_gpus", parse_bool, None),
    "MODELBUILD_CPU_SLOTS": ("cpu_slots", _positive_int, None),
    "MODELBUILD_CPU_THREADS": ("cpu_threads", _positive_int, None),
    "MODELBUILD_CPU_NUMERICS": ("cpu_numerics", _numerics, None),
    "MODELBUILD_THREADS": ("threads", _count, None),
    "MODELBUILD_DEVICE": ("device", _text, None),
    "RAY_ADDRESS": ("ray_address", _text, ""),
}
# read by the executor at build time, never by the loader: not part of the graph cache's key
RUN_ONLY = frozenset({"MODELBUILD_DOWNLOAD", "MODELBUILD_FORCE"})


class Settings:
    """The values of VARIABLES (None: unset, the TOML table or the built-in default decides)."""

    __slots__ = tuple(field for field, _, _ in VARIABLES.values())

    def __init__(self, **values):
        for field, _, default in VARIABLES.values():
            object.__setattr__(self, field, values.pop(field, default))
        if values:
            raise TypeError(f"Settings: unknown field(s) {', '.join(values)}")

    def __setattr__(self, name, value):
        raise AttributeError("Settings are read-only")

    def __delattr__(self, name):
        raise AttributeError("Settings are read-only")

    def _values(self) -> dict:
        return {field: getattr(self, field) for field in self.__slots__}

    def __eq__(self, other):
        return isinstance(other, Settings) and self._values() == other._values()

    def __hash__(self):
        return hash(tuple(self._values().items()))

    def __reduce__(self):
        return _rebuild, (self._values(),)

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self._values().items())})"


def _rebuild(values: dict) -> Settings:  # unpickling (Settings refuses setattr)
    return Settings(**values)


def read(environ=None) -> Settings:
    """The settings in ``environ`` (default: ``os.environ``); a bad value is a one-line UserError."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, (field, parse, _) in VARIABLES.items():
        text = environ.get(name)
        if text is not None and (text.strip() or name == "MODELBUILD_GPUS"):
            values[field] = parse(name, text)
    return Settings(**values)


current = read  # this process's settings, read from os.environ now


def graph_environment(environ=None) -> list[tuple[str, str]]:
    """Every MODELBUILD_* variable but the run-only ones, as the graph cache keys them."""
    environ = os.environ if environ is None else environ
    return sorted((k, v) for k, v in environ.items() if k.startswith("MODELBUILD_") and k not in RUN_ONLY)


def raw(names, environ=None) -> dict[str, str | None]:
    """The text of ``names`` as this process got them, for a report of what a stage saw
    (device-probe); decisions use ``read``."""
    environ = os.environ if environ is None else environ
    return {name: environ.get(name) for name in names}
