"""Parametric head models: the built-in head, FLAME (user-supplied) and ICT-FaceKit."""
from __future__ import annotations

from .model import HeadModel

__all__ = ["HeadModel", "load_head_model"]


def load_head_model(spec: str) -> HeadModel:
    """Load a head model from a short spec string.

    Args:
        spec: ``"builtin"``, ``"flame:PATH"`` (FLAME pickle or a folder holding one) or
            ``"ict:DIR"`` (ICT-FaceKit FaceXModel folder).
    Returns:
        :class:`HeadModel`.
    Raises:
        ValueError: unknown spec (one line listing the accepted forms).
        FileNotFoundError / hravatar.io.safe.CheckpointError: from the loaders.
    """
    kind, sep, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "builtin" and not arg:
        from .builtin import load_builtin_head

        return load_builtin_head()
    if kind == "flame" and sep and arg:
        from .flame import load_flame

        return load_flame(arg)
    if kind == "ict" and sep and arg:
        from .ict import load_ict

        return load_ict(arg)
    raise ValueError(f"unknown head model '{spec}': use 'builtin', 'flame:PATH' or 'ict:DIR'")
