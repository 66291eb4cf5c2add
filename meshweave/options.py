"""How options reach a :class:`~meshweave.config.Config` and back: TOML files, ``--section.key=value``
overrides (typed by the dataclass fields, unknown keys rejected with the known ones listed), the
resolved config as TOML, and the ``--help`` table. Imports nothing of meshweave but the config.
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import math
import os
import tomllib
import typing
from typing import Any

from meshweave.config import SECTIONS, Config, ConfigError, leaves, option_name

# --------------------------------------------------------------------------------------------
# loading and overrides


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _field_types(section_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _coerce(key: str, value: Any, tp: type) -> Any:
    """Convert a TOML value or a command-line string to ``tp``, or raise ConfigError."""
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        try:
            if tp is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return tp(text)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
        return float(value)
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    return value


def _field_name(option: str) -> str:
    return option + "_" if keyword.iskeyword(option) else option


def _known(obj: Any) -> str:
    return ", ".join(option_name(f.name) for f in dataclasses.fields(obj))


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set ``section[.sub].key`` (or ``out``) on ``cfg`` from a TOML value or string, type-checked.
    A dict value (a TOML sub-table) sets each of its keys below ``key``."""
    if key == "out":
        cfg.out = _coerce("out", value, str)
        return
    section, *path = key.split(".")
    if section not in SECTIONS or not path:
        raise ConfigError(
            f"unknown option {key!r}: options are <section>.<key> with section in "
            f"{', '.join(SECTIONS)} (see `meshweave train --help`)"
        )
    obj, where = getattr(cfg, section), section
    for i, part in enumerate(path):
        name = _field_name(part)
        types = _field_types(type(obj))
        if name not in types:
            raise ConfigError(f"unknown option {key!r}: {where} has {_known(obj)}")
        if dataclasses.is_dataclass(types[name]):
            if i == len(path) - 1:
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"{key} is a section: set its keys, e.g. --{key}.{_known(getattr(obj, name)).split(',')[0]}=..."
                    )
                for sub, v in value.items():
                    set_value(cfg, f"{key}.{sub}", v)
                return
            obj, where = getattr(obj, name), f"{where}.{part}"
            continue
        if i != len(path) - 1:
            raise ConfigError(f"unknown option {key!r}: {where}.{part} is not a section")
        setattr(obj, name, _coerce(key, value, types[name]))


def load_toml(path: str | os.PathLike[str], cfg: Config | None = None) -> Config:
    """Read a TOML file of ``[section]`` tables onto ``cfg`` (default: a fresh Config)."""
    cfg = cfg or Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    for section, table in data.items():
        if not isinstance(table, dict):
            set_value(cfg, section, table)
            continue
        for name, value in table.items():
            set_value(cfg, f"{section}.{name}", value)
    return cfg


def parse_overrides(args: list[str], cfg: Config) -> Config:
    """Apply ``--section.key=value`` / ``--section.key value`` / ``--out DIR`` to ``cfg``."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            value = args[i + 1]
            i += 1
        set_value(cfg, key, value)
        i += 1
    return cfg


def load(config_path: str | None, overrides: list[str]) -> Config:
    """Defaults, then the TOML file, then the command-line overrides (types checked, nothing else:
    meshweave.validation.resolve also validates)."""
    cfg = load_toml(config_path) if config_path else Config()
    return parse_overrides(overrides, cfg)


# --------------------------------------------------------------------------------------------
# rendering


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text that :func:`load_toml` reads back to an equal Config."""
    lines = [f"out = {_toml_value(cfg.out)}", ""]
    for section in SECTIONS:
        tables: dict[str, list[str]] = {}
        for key, owner, name in leaves(getattr(cfg, section), section):
            table, _, option = key.rpartition(".")
            tables.setdefault(table, []).append(f"{option} = {_toml_value(getattr(owner, name))}")
        for table, rows in tables.items():  # the section first, then its sub-sections
            lines += [f"[{table}]", *rows, ""]
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf") if not math.isnan(v) else "nan"
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v), ensure_ascii=False)  # JSON string escapes are valid TOML escapes


def options_help() -> str:
    """Every option with its type, default and allowed values, for ``meshweave train --help``."""
    default = Config()
    rows = [f"  {'--out DIR':<38} run directory (default: runs/default)"]
    for section in SECTIONS:
        for key, owner, name in leaves(getattr(default, section), section):
            value = getattr(owner, name)
            meta = next(f.metadata for f in dataclasses.fields(owner) if f.name == name)
            extra = meta.get("help", "")
            if meta.get("choices"):
                extra = (extra + "; " if extra else "") + "one of " + "|".join(meta["choices"])
            rows.append(f"  {'--' + key + '=' + _toml_value(value):<38} {extra}".rstrip())
    return "\n".join(rows)
