"""YAML the user gives (a recipe, a suite, a run folder's recipe.yaml, an override's value), read safely: the
safe loader only, bounded in bytes and in what its aliases expand to."""

from __future__ import annotations

from pathlib import Path

import yaml

from .checkpoints import require_file
from .errors import ConfigError

# What a YAML file the user gives (a recipe, a suite, a run folder's recipe.yaml) may hold: a recipe is a few
# kilobytes; aliases (`*name`) may repeat a value, but not blow a small file up to gigabytes ("billion laughs").
MAX_YAML_BYTES = 1_000_000
MAX_YAML_NODES = 100_000  # values, keys and list items, with every alias expanded
MAX_YAML_CHARS = 2_000_000  # characters of text, with every alias expanded


def read_yaml(path: str | Path, what: str = "recipe"):
    """The content of the user's YAML file `path` (a `what`: recipe, suite, ...), read safely: a regular file
    (not a folder, FIFO or device), at most `MAX_YAML_BYTES`, no Python tags, and refused before any Python
    object is built when its aliases expand beyond `MAX_YAML_NODES` values or `MAX_YAML_CHARS` characters.

    Raises:
        CheckpointNotFoundError: nothing is at `path`.
        ConfigError: anything else wrong with the file, in one sentence.
    """
    path = Path(path)
    name = f"{what} {str(path)!r}"
    require_file(path, what, ConfigError)  # a folder, a FIFO, a device: refused before it is opened
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{name} cannot be read ({err.strerror or err}); make it readable") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{name} is larger than {MAX_YAML_BYTES:,} bytes, too large for a {what}; give the {what} file "
            "itself (a few kilobytes of YAML)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{name} is not UTF-8 text; give a YAML {what} file") from None
    return parse_yaml(text, name)


def parse_yaml(text: str, what: str):
    """`text` parsed as YAML with the safe loader, its aliases expanded no further than `MAX_YAML_NODES`
    values and `MAX_YAML_CHARS` characters (counted on the composed graph, before any object is built).
    `what` names the text in messages ("recipe 'x.yaml'", "override 'method.lr=...': the value")."""
    try:  # the loader checks the characters first: a lone surrogate (an undecodable byte) is refused
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"{what} is not valid YAML text ({detail[:200]}); type it in UTF-8") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, what)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"{what} is not valid YAML ({detail[:200]}); fix its syntax") from None
    except RecursionError:
        raise ConfigError(f"{what} nests its lists and mappings too deeply for YAML; flatten it") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, what: str) -> None:
    """Refuse a YAML graph whose aliases expand beyond the bounds, or that contains itself (an alias inside
    its own anchor). Each node is counted once with the sizes of its children (memoized), so the check takes
    time linear in the file's size whatever the expansion."""
    sizes: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = (1, len(node.value))
            continue
        children = (
            [item for pair in node.value for item in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
        )
        if done:
            open_nodes.discard(key)
            nodes, chars = 1, 0
            for child in children:
                child_nodes, child_chars = sizes[id(child)]
                nodes, chars = nodes + child_nodes, chars + child_chars
            if nodes > MAX_YAML_NODES or chars > MAX_YAML_CHARS:
                raise ConfigError(
                    f"{what} expands to more than {MAX_YAML_NODES:,} values or {MAX_YAML_CHARS:,} characters "
                    "through its YAML aliases (*name); write the values out, or repeat fewer of them"
                )
            sizes[key] = (nodes, chars)
            continue
        if key in open_nodes:
            raise ConfigError(
                f"{what} contains itself through a YAML alias (*name inside its own &name); remove it"
            )
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise ConfigError(
                    f"{what} contains itself through a YAML alias (*name inside its own &name); remove it"
                )
            if id(child) not in sizes:
                stack.append((child, False))
