"""Config sections as plain dataclasses whose fields say everything about a key: its default,
its documentation, its choices (a ``Literal`` type, or a registry), and whether a resume may
change it. Loading, type and choice checks, ``--help`` and the resume guard all read the
fields, so a key is defined once: nothing else repeats its name or its choices.

A section derives from ``Section``: the choices of its fields are checked from their types (or
registries) whenever it is made, then its own ``check`` runs (``require``).
"""

from __future__ import annotations

import dataclasses
import textwrap
import types
import typing
from dataclasses import field

from .errors import ConfigError


def option(default, help: str, *, fixed_on_resume: bool = False,
           choices: typing.Callable[[], typing.Iterable] | None = None):
    """A config field with its documentation (``--help`` is generated from it).

    ``fixed_on_resume``: a resume that changes it is refused (the saved state depends on it).
    ``choices``: the valid values from a registry (a callable, read when the key is checked)."""
    metadata = {"help": help, "fixed_on_resume": fixed_on_resume, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Section:
    """A config section (``name``: its key prefix). Made from a config or in code, its fields'
    choices are checked from their types, then ``check`` checks what the types cannot say."""

    name: typing.ClassVar[str] = ""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            allowed = choices_of(f, hints[f.name])
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed and not (value is None and _optional(hints[f.name])):
                raise ConfigError(f"{self.name}.{f.name} must be one of {list(allowed)}, got {value!r}")
        self.check()

    def check(self) -> None:
        pass


def _optional(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def require(ok: bool, message: str) -> None:
    """A section's own check of its values, in its ``__post_init__``."""
    if not ok:
        raise ConfigError(message)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _sections(cls):
    """(field, section class) of a config made of sections."""
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]


def _leaves(cls, prefix: str = ""):
    """(``section.key``, field) of every key, through nested sections."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def valid_keys(cls) -> list[str]:
    return [key for key, _ in _leaves(cls)]


def fixed_keys(cls) -> list[str]:
    """Every ``section.key`` whose field is fixed on resume."""
    return [key for key, f in _leaves(cls) if f.metadata.get("fixed_on_resume")]


def choices_of(f, hint) -> tuple | None:
    """The values a field allows: its registry's, or its ``Literal``'s (inside ``| None`` too)."""
    if f.metadata.get("choices") is not None:
        return tuple(f.metadata["choices"]())
    hint = _without_none(hint)
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return None


def _without_none(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def parse_pairs(key: str, text: str) -> list[tuple[str, str]]:
    """``a:b,c:d`` (a mapping as typed on a command line) as [(a, b), (c, d)]."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item.count(":") != 1 or not all(p.strip() for p in item.split(":"))]
    if bad:
        raise ConfigError(f"{key}: {bad[0]!r} is not key:value (e.g. {key}=question:instruction,answer:output)")
    return [tuple(p.strip() for p in item.split(":")) for item in items]


def coerce(key: str, value, hint):
    """Check (and where lossless, convert) ``value`` for a field typed ``hint`` (its choices are
    the section's to check)."""
    if value is None and _optional(hint):
        return None
    hint = _without_none(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value
    if origin is dict:
        if isinstance(value, str):  # key:value,key:value on a command line
            value = dict(parse_pairs(key, value))
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping or key:value pairs, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(key, v, args[0]) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def build(cls, data: dict, root=None, prefix: str = ""):
    """``cls`` from a mapping: unknown keys and wrong types or choices are errors listing what
    is valid; a section's own ``__post_init__`` checks run as it is made."""
    root = root or cls
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys: "
                          f"{', '.join(valid_keys(root))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a section (mapping), got {value!r}")
            kwargs[name] = build(hint, value, root, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(prefix + name, value, hint)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def describe(cls, width: int = 100) -> str:
    """Every key with its default, choices and documentation (the fields' own), for --help."""
    lines = []
    for section, section_cls in _sections(cls):
        hints = _hints(section_cls)
        for f in dataclasses.fields(section_cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  {section.name}.{f.name} = {default!r}")
            text = f.metadata.get("help", "")
            allowed = choices_of(f, hints[f.name])
            if allowed:
                text += f" [one of: {', '.join(map(str, allowed))}]"
            if f.metadata.get("fixed_on_resume"):
                text += " [fixed on resume]"
            lines += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
