"""Reading config data before it is validated (:mod:`spice_ray.config`): a YAML file, guarded against
alias bombs (:func:`read_yaml`), ``--set section.key=value`` overrides (:func:`apply_overrides`), and
a pydantic ``ValidationError`` as one line for a user (:func:`_format_error`); all failures are a
:class:`ConfigError`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from spice_ray.config_secrets import redact


class ConfigError(ValueError):
    """A configuration problem, with a message fit to show a user as is (no traceback)."""


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a check across keys: its message names them
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            got = repr(redact(e.get("input"), key.rsplit(".", 1)[-1]))
            lines.append(f"{key or '<config>'}: {e['msg']} (got {got[:200]})")
    return "invalid config: " + "; ".join(lines)


def _parse_scalar(text: str) -> Any:
    """A --set value as YAML would read it: numbers, booleans, null, lists, else a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config dict (in place, also returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {key} is not a section")
            node = child
        node[keys[-1]] = _parse_scalar(value)
    return data


MAX_YAML_NODES = 100_000  # a config has hundreds; a "billion laughs" alias bomb expands to billions


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in ``node`` once every alias is expanded (memoized on the shared nodes: linear time)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content, or a one-line :class:`ConfigError` (missing, a folder, not UTF-8, not
    YAML, or an alias bomb: more than ``MAX_YAML_NODES`` nodes once its aliases are expanded)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        size = _expanded_size(root, {}) if root is not None else 0
        if size > MAX_YAML_NODES:
            raise ConfigError(f"config file {path} expands to {size:,} YAML nodes through its aliases (at most {MAX_YAML_NODES:,})")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
