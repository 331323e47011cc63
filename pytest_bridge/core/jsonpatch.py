"""A small, pure RFC 6902 (JSON Patch) and RFC 6901 (JSON Pointer) implementation.

Used to reason about and test the workload patches locally with exactly the semantics
the API server applies to ``application/json-patch+json`` bodies. It never mutates its
input and does no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_bridge.core.errors import JsonPatchError, PatchConflictError

__all__ = ["apply_patch", "escape_pointer_token", "pointer", "resolve_pointer"]

JsonOp = Mapping[str, Any]


def escape_pointer_token(token: str | int) -> str:
    """Escape one reference token (``~`` → ``~0``, ``/`` → ``~1``)."""
    return str(token).replace("~", "~0").replace("/", "~1")


def pointer(*tokens: str | int) -> str:
    """Build a JSON Pointer from unescaped tokens: ``pointer("a", "b/c", 0) == "/a/b~1c/0"``."""
    return "".join("/" + escape_pointer_token(token) for token in tokens)


def _split(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise JsonPatchError(f"JSON Pointer {path!r} must be empty or start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list[Any], token: str, path: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise JsonPatchError(f"{path!r}: {token!r} is not a valid array index")
    index = int(token)
    limit = len(container) if for_add else len(container) - 1
    if index > limit:
        raise JsonPatchError(f"{path!r}: index {index} is out of range (array length {len(container)})")
    return index


def _walk(doc: Any, tokens: Sequence[str], path: str) -> Any:
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                raise JsonPatchError(f"{path!r}: member {token!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, path, for_add=False)]
        else:
            raise JsonPatchError(f"{path!r}: cannot descend into a scalar at {token!r}")
    return node


def resolve_pointer(doc: Any, path: str) -> Any:
    """Return the value at ``path``; :class:`JsonPatchError` if it does not exist."""
    return _walk(doc, _split(path), path)


def _add(doc: Any, path: str, value: Any) -> Any:
    tokens = _split(path)
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, path, for_add=True), value)
    else:
        raise JsonPatchError(f"{path!r}: parent is not an object or array")
    return doc


def _remove(doc: Any, path: str) -> tuple[Any, Any]:
    tokens = _split(path)
    if not tokens:
        raise JsonPatchError("cannot remove the whole document")
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise JsonPatchError(f"{path!r}: member {last!r} does not exist")
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(parent, last, path, for_add=False))
    raise JsonPatchError(f"{path!r}: parent is not an object or array")


def _json_equal(left: Any, right: Any) -> bool:
    # RFC 6902 4.6: numbers compare by value, but a JSON boolean is never a number.
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(_json_equal(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    return type(left) is type(right) and bool(left == right)


def _apply_one(doc: Any, op: JsonOp, position: int) -> Any:
    name = op.get("op")
    path = op.get("path")
    if not isinstance(path, str):
        raise JsonPatchError(f"operation {position}: 'path' is missing or not a string")
    if name == "add":
        return _add(doc, path, copy.deepcopy(_required(op, "value", position)))
    if name == "remove":
        return _remove(doc, path)[0]
    if name == "replace":
        value = copy.deepcopy(_required(op, "value", position))
        if not path:
            return value
        doc, _ = _remove(doc, path)
        return _add(doc, path, value)
    if name in ("move", "copy"):
        source = op.get("from")
        if not isinstance(source, str):
            raise JsonPatchError(f"operation {position}: {name!r} needs a string 'from'")
        if name == "move":
            if path.startswith(source + "/"):
                raise JsonPatchError(f"operation {position}: cannot move {source!r} into its own child")
            doc, value = _remove(doc, source)
        else:
            value = copy.deepcopy(resolve_pointer(doc, source))
        return _add(doc, path, value)
    if name == "test":
        expected = _required(op, "value", position)
        try:
            actual = resolve_pointer(doc, path)
        except JsonPatchError as e:
            raise PatchConflictError(f"test failed: {path!r} does not exist (expected {expected!r})") from e
        if not _json_equal(actual, expected):
            raise PatchConflictError(f"test failed: {path!r} is {actual!r}, expected {expected!r}")
        return doc
    raise JsonPatchError(f"operation {position}: unknown op {name!r}")


def _required(op: JsonOp, key: str, position: int) -> Any:
    if key not in op:
        raise JsonPatchError(f"operation {position} ({op.get('op')!r}) needs {key!r}")
    return op[key]


def apply_patch(doc: Any, patch: Sequence[JsonOp]) -> Any:
    """Apply ``patch`` to a deep copy of ``doc`` atomically and return the result.

    Raises :class:`PatchConflictError` when a ``test`` fails and :class:`JsonPatchError`
    for any other invalid operation; ``doc`` is never modified.
    """
    result = copy.deepcopy(doc)
    for position, op in enumerate(patch):
        result = _apply_one(result, op, position)
    return result
