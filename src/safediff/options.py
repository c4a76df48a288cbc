"""One option grammar for guards, erasers, attacks, detectors and budgets: ``NAME[:PRESET][,KEY=VALUE...]``.

- ``NAME`` is a registry name (``sld``, ``uce``, ``p4d-n``, ``nudenet``); ``PRESET`` a named set of values of that
  method (``sld:max``, ``nudenet:exposed9``); each ``KEY=VALUE`` sets one option. ``sld:max,safety_scale=2000``,
  ``uce:lamb=0.3``, ``concept-inversion:n_images=2,batch=2``, ``nudenet:exposed9,threshold=0.45``. A budget is the
  options part alone: ``iterations=40,unet_forward=500``.
- Keys may use ``-`` for ``_``. A list value separates its items with ``;`` (``templates=a {};the {}``), since ``,``
  separates options.
- Values are typed by the dataclass field (or constructor parameter) they name: ``bool`` (1/0, true/false, yes/no,
  on/off), ``int``, ``float`` (finite only), ``str``, ``tuple[str, ...]`` / ``tuple[int, ...]``, each optionally
  ``| None`` (``none``/``null``/empty -> None). A field declared with ``option(low=, high=, help=)`` is also range
  checked; ``check_fields`` applies the same conversions and checks to an object built in code.
Every bad spec is one ``SafediffError`` naming what is wrong and what is accepted.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from safediff.errors import SafediffError

LIST_SEPARATOR = ";"


@dataclass
class Spec:
    """A parsed ``NAME[:PRESET][,KEY=VALUE...]``; option values are still text."""

    name: str
    preset: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: "str | Spec", kind: str) -> "Spec":
        if isinstance(text, Spec):
            return Spec(text.name, text.preset, dict(text.options))
        name, _, rest = (text or "").strip().partition(":")
        name = name.strip()
        if not name:
            raise SafediffError(f"empty {kind} spec; accepted: NAME[:PRESET][,KEY=VALUE...]")
        preset, options = None, {}
        for part in _parts(rest):
            key, eq, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not eq:
                if preset is not None or options:
                    raise SafediffError(f"{kind} '{text}': '{part}' is not KEY=VALUE; a preset comes first, once "
                                        "(NAME:PRESET,KEY=VALUE...)")
                preset = part
            elif key in options:
                raise SafediffError(f"{kind} '{text}': option '{key}' given twice")
            else:
                options[key] = value.strip()
        return cls(name, preset, options)

    def __str__(self) -> str:
        rest = ([self.preset] if self.preset else []) + [f"{k}={v}" for k, v in self.options.items()]
        return self.name + (":" + ",".join(rest) if rest else "")


def _parts(text: str) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def split_specs(text: str) -> list[str]:
    """``base,uce;speed:tokens=to_end,n_aug=2`` -> base, uce, speed:tokens=to_end,n_aug=2 (a list of specs on one
    command line): a semicolon always starts a new spec; a comma does unless what follows is a KEY=VALUE option of the
    spec before it (``NAME:KEY=VALUE`` is a spec of its own)."""
    out: list[str] = []
    for chunk in text.split(";"):
        first = True
        for part in (p.strip() for p in chunk.split(",")):
            option = "=" in part and ":" not in part.split("=", 1)[0]
            if part and option and not first and out and ":" in out[-1]:
                out[-1] += f",{part}"
            elif part:
                out.append(part)
                first = False
    return out


def parse_options(text: str | None, owner: str) -> dict[str, str]:
    """``"k=5, lr=0.01"`` -> ``{"k": "5", "lr": "0.01"}`` (the options part of a spec, e.g. a budget)."""
    out: dict[str, str] = {}
    for part in _parts(text or ""):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise SafediffError(f"{owner}: '{part}' is not KEY=VALUE")
        if key in out:
            raise SafediffError(f"{owner}: option '{key}' given twice")
        out[key] = value.strip()
    return out


def option(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
           help: str = "", hyperparameter: bool = True, default_factory: Any = dataclasses.MISSING):
    """A dataclass field that is an option: closed range [low, high] (either end optional) and a help text.
    ``hyperparameter=False`` keeps it out of recorded hyper-parameters and out of the grammar (e.g. a checkpoint
    path)."""
    meta = {"low": low, "high": high, "help": help, "hyperparameter": hyperparameter}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # the annotation as text, e.g. "int", "float | None", "tuple[str, ...]"
    low: float | None = None
    high: float | None = None


def _type_text(annotation) -> str:
    """An annotation as text (``from __future__ import annotations`` makes them strings already)."""
    if isinstance(annotation, str):
        return annotation
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _params(target, accepted: list[str] | None = None, every_field: bool = False) -> dict[str, Param]:
    """The settable options of a dataclass (fields that are hyper-parameters; with ``every_field`` all init fields)
    or of a callable's keywords."""
    if dataclasses.is_dataclass(target):
        items = [Param(f.name, _type_text(f.type), f.metadata.get("low"), f.metadata.get("high"))
                 for f in dataclasses.fields(target)
                 if f.init and (every_field or f.metadata.get("hyperparameter", True))]
    else:
        sig = inspect.signature(target)
        items = [Param(p.name, _type_text(p.annotation)) for p in sig.parameters.values()
                 if p.name not in ("self", "preset") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    out = {p.name: p for p in items}
    return out if accepted is None else {k: v for k, v in out.items() if k in accepted}


def convert(param: Param, value: Any, owner: str) -> Any:
    """``value`` (text, or a value given in code) as the parameter's type, range-checked; else SafediffError."""
    kind = param.kind.replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", ""):
        value = None
    if value is None:
        if optional or kind not in ("bool", "int", "float"):
            return None
        raise SafediffError(f"{owner}: {param.name} needs a {kind} value")
    try:
        if kind == "bool":
            out = _bool(value)
        elif kind == "int":
            out = _int(value)
        elif kind == "float":
            out = float(value.strip() if isinstance(value, str) else value)
            if not math.isfinite(out):
                raise ValueError(value)
        elif kind.startswith("tuple"):
            items = value.split(LIST_SEPARATOR) if isinstance(value, str) else list(value)
            items = [w.strip() if isinstance(w, str) else w for w in items]
            items = [w for w in items if w != ""]
            out = tuple(_int(w) for w in items) if kind.startswith("tuple[int") else tuple(str(w) for w in items)
        else:
            out = value.strip() if isinstance(value, str) else value
    except (TypeError, ValueError):
        shown = value if isinstance(value, str) else repr(value)
        what = "finite number" if kind == "float" else kind
        raise SafediffError(f"{owner}: {param.name}={shown} is not a valid {what}") from None
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        if (param.low is not None and out < param.low) or (param.high is not None and out > param.high):
            lo = "-inf" if param.low is None else f"{param.low:g}"
            hi = "inf" if param.high is None else f"{param.high:g}"
            raise SafediffError(f"{owner}: {param.name} must be in [{lo}, {hi}], got {out:g}")
    return out


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _int(value) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    number = float(value) if not isinstance(value, str) else None
    if number is not None:
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    return int(value.strip())


def typed_values(target, options: dict[str, str], owner: str, accepted: list[str] | None = None) -> dict:
    """Option texts -> typed values for the dataclass or callable ``target``; an unknown key -> SafediffError
    listing the accepted ones."""
    params = _params(target, accepted)
    out = {}
    for key, value in options.items():
        key = key.replace("-", "_")
        if key not in params:
            raise SafediffError(f"{owner}: unknown option '{key}'; accepted: {', '.join(sorted(params)) or '(none)'}")
        out[key] = convert(params[key], value, owner)
    return out


def check_fields(obj, owner: str) -> None:
    """Convert and range-check every option field of the dataclass instance ``obj`` in place (from ``__post_init__``),
    so objects built in code obey the same rules as parsed specs."""
    for name, param in _params(type(obj), every_field=True).items():
        object.__setattr__(obj, name, convert(param, getattr(obj, name), owner))


def help_lines(target) -> list[str]:
    """``KEY (TYPE, range): help`` for every option of a dataclass (for --help texts and docs)."""
    out = []
    for f in dataclasses.fields(target):
        if not f.metadata.get("hyperparameter", True) or not f.init:
            continue
        low, high = f.metadata.get("low"), f.metadata.get("high")
        rng = "" if low is None and high is None else f", [{'' if low is None else f'{low:g}'}, " \
                                                      f"{'' if high is None else f'{high:g}'}]"
        text = f.metadata.get("help", "")
        out.append(f"{f.name} ({f.type}{rng})" + (f": {text}" if text else ""))
    return out


def with_preset(owner: str, params_cls, presets: dict[str, dict], default: str | None, preset: str | None,
                overrides: dict) -> tuple[str | None, Any]:
    """``params_cls`` built from a preset's values (``preset``, else ``default``) with ``overrides`` (texts from a
    spec or values given in code) on top; an unknown preset or key, a missing or out-of-range value ->
    SafediffError."""
    if preset is not None and preset not in presets:
        accepted = ", ".join(presets) if presets else f"none ({owner} has no presets)"
        raise SafediffError(f"{owner}: unknown preset '{preset}'; accepted: {accepted}")
    chosen = preset if preset is not None else default
    values = {**(presets[chosen] if chosen is not None else {}), **typed_values(params_cls, overrides, owner)}
    missing = [k for k in _params(params_cls) if k not in values]
    if missing:
        raise SafediffError(f"{owner}: no value for {', '.join(missing)}; give a preset ({', '.join(presets)}) or "
                            "set them")
    return chosen, params_cls(**values)
