"""Frozen dataclass configs read from YAML.

One loader for every config in synthlesion: ``yaml.safe_load``, nested dataclasses, unknown
keys rejected with the full dotted key, types checked, ``key.sub=value`` overrides from the
command line, and the resolved config written beside every output.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from synthlesion.errors import ConfigError
from synthlesion.storage import atomic_write_text

T = TypeVar("T")


def load_config(
    cls: type[T],
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build a frozen dataclass config from a YAML file or mapping plus overrides.

    Args:
        cls: The (frozen) dataclass type.
        source: YAML path, an already parsed mapping, or ``None`` for all defaults.
        overrides: ``"dotted.key=value"`` strings; values are parsed as YAML scalars.

    Raises:
        ConfigError: unknown key, wrong type, missing required field, unreadable file.
    """
    where = "<mapping>" if source is None or isinstance(source, Mapping) else str(source)
    data = read_mapping(source)
    for item in overrides:
        key, value = parse_assignment(item, "override", "key.sub=value")
        _set_dotted(data, key.split("."), value)
    return _build(cls, data, where, prefix="")


def read_mapping(source: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """A config's mapping: ``{}`` for ``None``, a copy of a mapping, or a YAML file's top level.

    Raises:
        ConfigError: unreadable file, invalid YAML, or a top level that is not a mapping.
    """
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return dict(source)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config ({exc})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    return data


def parse_assignment(item: str, what: str, form: str = "KEY=VALUE") -> tuple[str, Any]:
    """``"key=value"`` as ``(key, YAML value)`` (command-line overrides and settings).

    Raises:
        ConfigError: no ``=``, an empty key or an unreadable value; names ``what``.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{what} {item!r} must look like {form}")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {item!r}: unreadable value ({exc})") from None


def add_override_argument(parser: Any, example: str, dest: str = "overrides") -> None:
    """The repeatable ``--set KEY=VALUE`` option of the commands that read a config."""
    parser.add_argument(
        "--set",
        dest=dest,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable; values are YAML)",
    )


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a dataclass config (paths and tuples turned into str and lists)."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    atomic_write_text(path, text)
    return Path(path)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _build(cls: type[T], data: Mapping[str, Any], where: str, prefix: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {names}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, where, prefix + name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _convert(hint: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: {key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, key + ".")
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        if origin is tuple and len(args) >= 2 and args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: {key} must have {len(args)} items, got {value!r}")
            return tuple(_convert(a, v, where, key) for a, v in zip(args, value, strict=True))
        items = [_convert(inner, v, where, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, where, key): _convert(vt, v, where, key) for k, v in value.items()}
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: {key} must be a path, got {value!r}")
        return Path(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    return value


# --- command-line value types (argparse ``type=``): a bad value is a usage error (exit 2) ---


def _ranged(kind: type, accept: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` (finite) that ``accept`` takes, else a usage
    error saying ``rule``."""

    def parse(text: str) -> Any:
        value = _number(text, kind)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    parse.__name__ = rule
    return parse


count_arg = _ranged(int, lambda v: v >= 1, "a whole number >= 1")
"""Counts, steps, batch sizes, limits."""
seed_arg = _ranged(int, lambda v: v >= 0, "a whole number >= 0")
"""Seeds and label values."""
share_arg = _ranged(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
"""Shares and fractions."""
weight_arg = _ranged(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
"""Relative weights."""
length_arg = _ranged(float, lambda v: v >= 0.0, "a number >= 0")
"""Distances in mm, tolerances."""
positive_arg = _ranged(float, lambda v: v > 0.0, "a number > 0")
"""Volumes in mm^3."""


def bounded_count_arg(low: int, high: int) -> Callable[[str], int]:
    """A whole number in ``[low, high]``, for sizes and counts whose cost grows with them (a
    typo of 10**9 fails as a usage error instead of filling memory)."""
    return _ranged(int, lambda v: low <= v <= high, f"a whole number in [{low}, {high}]")


def check_device(device: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        ConfigError: an unknown device, or a GPU that torch cannot see (no GPU, a CPU-only torch
            build, ``CUDA_VISIBLE_DEVICES`` hiding it, ``cuda:N`` past the last GPU).
    """
    text = str(device).strip()
    if not re.fullmatch(r"cpu(:0)?|mps|cuda(:(0|[1-9][0-9]*))?", text, flags=re.ASCII):
        raise ConfigError(f"device {text!r}: use cpu, cuda, cuda:N or mps")
    kind, _, index = text.partition(":")
    if kind == "cpu":
        return text
    import torch

    if kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"device {text!r}: no Apple GPU (MPS) is available; use cpu")
        return text
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ConfigError(
            f"device {text!r}: torch sees no CUDA GPU (torch {torch.__version__}, {build}"
            + (
                f"; CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
                if "CUDA_VISIBLE_DEVICES" in os.environ
                else ""
            )
            + "); use --device cpu, or install the CUDA build of torch on a GPU machine"
        )
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {text!r}: this machine has {torch.cuda.device_count()} GPU(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return text


def device_arg(text: str) -> str:
    """:func:`check_device` as an argparse type (a usage error, not a traceback)."""
    try:
        return check_device(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def regex_arg(text: str) -> str:
    """A regular expression that compiles (returned as text)."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {exc}") from None
    return text


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a {'whole number' if kind is int else 'number'}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def check_counts(**counts: int | None) -> list[str]:
    """Problems of options that count something (each must be a whole number >= 1; ``None``
    means unset): the same rule as :func:`count_arg`, for options given through the API."""
    return [
        f"{name} must be a whole number >= 1, got {value!r}"
        for name, value in counts.items()
        if value is not None
        and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
    ]
