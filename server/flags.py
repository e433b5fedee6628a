"""Command-line flags built from the config dataclasses' fields (engine.config.option), so a setting's name,
default, choices and help are written once: on its field. The sampling flags of `run` / `chat` take their
defaults from SamplingParams and their ranges from the Workers AI contract (engine/limits.py), like the
/openapi.json spec of that route."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from engine.limits import WORKERS
from engine.sampling_params import SamplingParams

SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls` declared with option(); absent flags leave the field's own default."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if "help" not in meta or f.name in skip:
            continue
        default = _default(f)
        names = [meta.pop("flag") or "--" + f.name.replace("_", "-"), *meta.pop("aliases", ())]
        meta.pop("convert", None)
        shown = "" if default in (None, ()) else f" (default: {_show(default)})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta.pop("help") + shown, **meta}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.setdefault("metavar", names[0].lstrip("-").upper().replace("-", "_"))
            if "type" not in kw and default is not None and not isinstance(default, tuple):
                kw["type"] = type(default)
        parser.add_argument(*names, **kw)


def from_args(cls, args: argparse.Namespace, **extra):
    """`cls` from the flags the user gave (converted), plus `extra` fields."""
    values = {}
    for f in dataclasses.fields(cls):
        if "help" in f.metadata and hasattr(args, f.name):
            v = getattr(args, f.name)
            convert = f.metadata.get("convert")
            values[f.name] = tuple(v) if isinstance(v, list) else convert(v) if convert and v is not None else v
    return cls(**values, **extra)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    defaults = SamplingParams()
    for name in SAMPLING_FLAGS:
        rng = WORKERS[name]
        default = getattr(defaults, name) if name in ("max_tokens", "temperature") else None
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=int if rng.integer else float,
                            default=default, help=f"{rng.span()}" + ("" if default is None else
                                                                     f", default {default}"))


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags, checked against the Workers AI ranges (ValueError naming the flag)."""
    values = {}
    for name in SAMPLING_FLAGS:
        v = getattr(args, name)
        if v is None:
            continue
        if not WORKERS[name].contains(v):
            raise ValueError(f"{name}: must be {WORKERS[name].describe()}, got {v}")
        values[name] = v
    return SamplingParams(**values)
