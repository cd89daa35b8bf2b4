"""Config dataclass helpers: argparse options generated from them (one source of truth for
defaults) and reconstruction from their JSON form (as stored in checkpoints)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_optional) of a field annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "", group_title: str | None = None,
                            overrides_only: bool = False, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--prefix-field`` option per field of dataclass ``cls`` (defaults from ``cls``).

    Supports bool (``--x/--no-x``), int, float, str, Optional[...] and tuple[...] fields;
    nested dataclass fields and names in ``skip`` are left out. With ``overrides_only`` an option
    the user does not give is absent from the namespace (see :func:`apply_overrides`).
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(group_title or cls.__name__)
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        if f.name in skip or dataclasses.is_dataclass(tp):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = default
        if overrides_only:
            default = argparse.SUPPRESS
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        dest = f"{prefix.replace('-', '_')}{f.name}"
        if tp is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=f"(default {shown})")
        elif typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            nargs = "+" if args[-1] is Ellipsis else len(args)  # tuple[str, ...]: one or more values
            group.add_argument(flag, dest=dest, type=args[0], nargs=nargs, default=default, help=f"(default {shown})")
        elif tp in (int, float, str):
            conv = tp
            if optional:
                conv = lambda s, t=tp: None if s.lower() == "none" else t(s)  # noqa: E731
            group.add_argument(flag, dest=dest, type=conv, default=default, help=f"(default {shown})")


def dataclass_from_dict(cls: type, d: dict):
    """Rebuild dataclass ``cls`` from its ``asdict``/JSON form.

    Nested dataclass fields are rebuilt recursively, JSON lists become tuples, unknown keys are
    ignored and missing ones keep their defaults (older checkpoints stay readable).
    """
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        tp, _ = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = dataclass_from_dict(tp, v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[f.name] = v
    return cls(**kw)


def apply_overrides(obj, ns: argparse.Namespace, prefix: str = ""):
    """Copy of dataclass instance ``obj`` with the fields given on the command line replaced."""
    kw = {}
    for f in dataclasses.fields(obj):
        dest = f"{prefix.replace('-', '_')}{f.name}"
        if hasattr(ns, dest):
            v = getattr(ns, dest)
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return dataclasses.replace(obj, **kw)
