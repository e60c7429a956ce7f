"""A stage's view of the config: the parts it declares (:class:`spice_ray.stages.Stage`: ``reads``,
``sees`` and its active ``parts``) read as from the :class:`~spice_ray.config.Config` itself, and
anything else an :class:`UndeclaredConfigRead` that names the stage and the setting. So a stage
cannot depend on a setting its key does not cover without the pipeline saying so at once.

``allowed`` holds dotted names: a section (``"sketch"``), a nested section (``"model.proxy_lora"``) or
one field (``"corpus.max_tokens"``). A section declared whole is handed out as the config's own
object (so ``resources_of``, ``model_dump`` and assignment work on it as before); a section declared
in part is a view of its declared fields. ``model_copy`` gives a view of the copy (the same
declarations); dumping or fingerprinting what is not declared whole is an undeclared read.
"""

from __future__ import annotations

from typing import Any

WHOLE: dict[str, Any] = {}  # the marker of a name declared whole (compared by identity)


class UndeclaredConfigRead(RuntimeError):
    """A stage read a config setting it does not declare."""


def _tree(allowed: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("model.proxy_lora", "corpus")`` → ``{"model": {"proxy_lora": WHOLE}, "corpus": WHOLE}``."""
    tree: dict[str, Any] = {}
    for dotted in allowed:
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is WHOLE:
                break
            node = node.setdefault(part, {})
        else:
            node[leaf] = WHOLE
    return tree


class ConfigView:
    """``node`` (a :class:`~spice_ray.config.Config` or one of its sections) as ``stage`` sees it."""

    __slots__ = ("_node", "_tree", "_stage", "_path")

    def __init__(self, node: Any, allowed: tuple[str, ...] | list[str] | dict[str, Any], stage: str, path: str = "") -> None:
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_tree", allowed if isinstance(allowed, dict) else _tree(allowed))
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_path", path)

    def _dotted(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _refuse(self, what: str) -> UndeclaredConfigRead:
        declared = ", ".join(_flatten(self._tree, self._path)) or "nothing"
        where = f" under {self._path}" if self._path else ""
        return UndeclaredConfigRead(
            f"stage {self._stage} reads {what}, which it does not declare (it declares{where}: {declared}); "
            "add it to the stage's reads (it changes the stage's output: part of its key) or sees (it does not)")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ConfigView.__slots__:  # copy and pickle probe for these
            raise AttributeError(name)
        sub = self._tree.get(name)
        if sub is None:
            raise self._refuse(f"config {self._dotted(name)}")
        value = getattr(self._node, name)
        return value if sub is WHOLE else ConfigView(value, sub, self._stage, self._dotted(name))

    def __setattr__(self, name: str, value: Any) -> None:
        if self._tree.get(name) is not WHOLE:
            raise self._refuse(f"config {self._dotted(name)} (an assignment)")
        setattr(self._node, name, value)

    def model_copy(self, *, deep: bool = False) -> ConfigView:
        """A view of a copy of the config, with the same declarations."""
        return ConfigView(self._node.model_copy(deep=deep), self._tree, self._stage, self._path)

    def model_dump(self, **kwargs: Any) -> Any:
        raise self._refuse(f"all of config {self._path or '(the whole config)'}")

    def fingerprint(self, *sections: str) -> str:
        """The config's :meth:`~spice_ray.config.Config.fingerprint` of sections declared whole."""
        missing = [s for s in sections if self._tree.get(s) is not WHOLE] if sections else ["(the whole config)"]
        if missing:
            raise self._refuse(f"all of config {', '.join(missing)} (a fingerprint)")
        return str(self._node.fingerprint(*sections))

    def __repr__(self) -> str:
        return f"ConfigView(stage={self._stage!r}, path={self._path!r}, declares={_flatten(self._tree, self._path)})"


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, sub in tree.items():
        dotted = f"{prefix}.{name}" if prefix else name
        out += [dotted] if sub is WHOLE else _flatten(sub, dotted)
    return out
