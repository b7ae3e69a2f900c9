"""Configs: one dataclass per command, each field documented once; a TOML file and ``--field value``.

    @dataclass
    class SFTConfig:
        lr: float = option(2e-3, "peak learning rate (AdamW)")

    cfg = parse_config(SFTConfig, ["--config", "run.toml", "--lr", "1e-3"])   # flags beat the file

Unknown fields and values of the wrong type are rejected with a message that names the field and the
source (file or flag). The resolved config is written to the run folder with :func:`save_config`.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path

import tomli_w


class ConfigError(ValueError):
    pass


def option(default, help: str):
    """A config field with its one-line documentation (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _coerce(value, typ, where: str):
    """``value`` (a TOML value or a command-line string) as ``typ``, or a ConfigError naming ``where``."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else str, where) for v in value]
    if origin is dict or typ is dict:
        if isinstance(value, str):
            value = _parse_pairs(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {str(k): _coerce(v, args[1], where) if args else v for k, v in value.items()}
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool) or (typ is int and isinstance(value, float)):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _parse_pairs(text: str, where: str) -> dict:
    """``"a=3,b=x,c=0.5"`` -> ``{"a": 3, "b": "x", "c": 0.5}``: values are read as TOML (numbers, booleans,
    lists, inline tables), else kept as strings; commas inside brackets do not split.

    >>> _parse_pairs("digits=[2,5],terms=2,name=x", "--task-options")
    {'digits': [2, 5], 'terms': 2, 'name': 'x'}
    """
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth <= 0:
            items.append(text[start:i].strip())
            start = i + 1
    out = {}
    for item in filter(None, items):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{where}: expected key=value pairs separated by commas, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw.strip()
    return out


def _check_names(cls, names, source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for n in names:
        if n not in known:
            raise ConfigError(f"{source}: unknown field {n!r} (known: {', '.join(sorted(known))})")


def parse_config(cls, argv: list[str]):
    """A ``cls`` from defaults, then ``--config FILE.toml``, then ``--field value`` flags."""
    flags: dict[str, str] = {}
    file_values: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are written --field value")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            typ = _types(cls).get(key)
            if typ is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                val = "true"  # a bare boolean flag
            elif i + 1 < len(argv):
                i += 1
                val = argv[i]
            else:
                raise ConfigError(f"--{key} needs a value")
        if key == "config":
            path = Path(val)
            try:
                file_values = tomllib.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such config file") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: invalid TOML ({e})") from None
            _check_names(cls, file_values, str(path))
        else:
            flags[key] = val
        i += 1
    _check_names(cls, flags, "command line")
    hints = _types(cls)
    values = {k: _coerce(v, hints[k], f"field {k!r} in the config file") for k, v in file_values.items()}
    values.update({k: _coerce(v, hints[k], f"--{k.replace('_', '-')}") for k, v in flags.items()})
    return _construct(cls, values)


def build_config(cls, values: dict, source: str):
    """A ``cls`` from a dict (e.g. one stage of a recipe); errors name ``source`` and the field."""
    _check_names(cls, values, source)
    hints = _types(cls)
    return _construct(cls, {k: _coerce(v, hints[k], f"{source}: field {k!r}") for k, v in values.items()})


def _construct(cls, values: dict):
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as TOML (None values are left out: TOML has no null)."""
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    Path(path).write_text(tomli_w.dumps(data))


def write_json(path: Path, data) -> None:
    """Write JSON atomically: a crash leaves the file missing or the old one, never half-written."""
    import json
    import os

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def claim_folder(cfg, out: Path, what: str) -> Path:
    """The output folder of a multi-part experiment (``cfg`` has ``overwrite``): one made by the same config is
    kept, so a rerun continues from its finished parts; one of another config is refused unless
    ``cfg.overwrite``, which empties it. The config is saved as ``out/config.toml``."""
    import shutil

    saved = out / "config.toml"
    if saved.is_file() and not cfg.overwrite:
        settings = lambda d: {k: v for k, v in d.items() if v is not None and k != "overwrite"}  # noqa: E731
        old, now = settings(tomllib.loads(saved.read_text())), settings(dataclasses.asdict(cfg))
        defaults = settings(dataclasses.asdict(type(cfg)()))
        # a field added since the folder was made: its run used the default, so the default still matches
        now = {k: v for k, v in now.items() if k in old or k not in defaults or v != defaults[k]}
        if old != now:
            raise ConfigError(f"{out} holds {what} of another config ({saved}); use another --out or --overwrite")
    elif cfg.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    return out


def config_help(cls) -> str:
    """One line per field: name, type, default, documentation."""
    lines = []
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited)  # own fields first, shared last
    for f in fields:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        typ = _types(cls)[f.name]
        tname = getattr(typ, "__name__", str(typ).replace("typing.", ""))
        lines.append(f"  --{f.name.replace('_', '-'):<22} {tname:<12} default {default!r:<12} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def check(condition: bool, message: str) -> None:
    """Raise a ConfigError when a field value is out of range (used in configs' ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)
