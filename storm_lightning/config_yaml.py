"""YAML configs whose aliases cannot multiply: a config (a run's config.yaml beside a downloaded checkpoint
is someone else's file) is refused when its values, with every alias expanded, number more than
``MAX_VALUES``. ``yaml.safe_load`` shares an aliased node, so a 591-byte file of ten nested levels of
ten aliases loads in microseconds and then expands to 10^10 values in whatever walks it (jsonargparse's
checks: 2.4 GB in 33 s, then out of memory). Anchors used as intended (a shared block) stay accepted.
A key given twice in one mapping (YAML keeps the last, without a word) is refused too: it is a typo or
a merge slip, and a value set twice in a config file is one the reader cannot trust.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storm_lightning.errors import UserError

MAX_VALUES = 1_000_000


def expanded_size(value: Any, source: str) -> int:
    """Values in ``value`` with aliases expanded (each shared node counted once per use, computed once);
    a recursive alias, or more than ``MAX_VALUES``: UserError naming ``source``."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise UserError(f"{source}: a YAML alias refers to a node that contains it (a recursive config)")
        open_nodes.add(id(node))
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_VALUES:
                raise UserError(f"{source}: expands to more than {MAX_VALUES} values (YAML aliases of aliases)")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    try:
        return size(value)
    except RecursionError:
        raise UserError(f"{source}: nested too deeply to be a config") from None


def repeated_keys(text: str) -> list[str]:
    """Keys given twice in one mapping of the YAML ``text``, from its node graph (each node visited once:
    an alias is not walked again). Text that does not compose: [] (the loader reports it)."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    repeated, seen, todo = [], set(), [root]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.value != "<<"]
            repeated += sorted({k for k in keys if keys.count(k) > 1})
            todo += [v for _, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            todo += node.value
    return repeated


def check_yaml(text: str, value: Any, source: str) -> None:
    """What a loaded config ``value`` (from ``text``) must pass: bounded expansion, no repeated key."""
    expanded_size(value, source)
    repeated = repeated_keys(text) if isinstance(text, str) else []
    if repeated:
        raise UserError(f"{source}: the key '{repeated[0]}' is given twice in one mapping (YAML would keep the "
                        "last silently); write it once")


def bounded(load: Callable[[str], Any]) -> Callable[[str], Any]:
    """A YAML loader (jsonargparse's) that refuses what ``check_yaml`` refuses."""
    def load_bounded(text: str) -> Any:
        value = load(text)
        check_yaml(text, value, "a YAML config")
        return value

    return load_bounded
