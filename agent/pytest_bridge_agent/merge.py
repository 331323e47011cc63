"""Restore a workload someone changed while it was bridged: undo only what is still ours.

The reverse patch of a bridge tests that the workload still carries the agent, so it is
refused when someone ran ``kubectl set image``, ``kubectl scale`` or ``kubectl apply`` during
the session. Re-applying the original would throw their change away; retrying for ever helps
nobody. :func:`merge_restore` is a three-way merge instead, over the places the bridge changed
(the forward patch): where the current value is still what the bridge set, the original comes
back; where someone changed it, their value is kept and named. Inside the replaced container
this goes field by field, so ``kubectl set image`` during a session ends with the original
container running their new image.

The result is a JSON Patch that first tests the ``resourceVersion`` it was computed from, so
a change racing with it is refused rather than overwritten (compute again and retry).

Pure and stdlib only: the guard runs it in the cluster, the plugin at close.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MergedRestore", "merge_restore", "refused_as_invalid"]

_MISSING: Any = object()
# Where the merged object is written back: everything a bridge changes lives below these.
_WRITTEN = (("metadata", "labels"), ("metadata", "annotations"), ("spec",))


class MergedRestore:
    """The patch that undoes what is still ours, and where someone else's change was kept."""

    def __init__(self, patch: list[dict[str, Any]], kept: list[str]) -> None:
        self.patch = patch
        self.kept = kept

    def __repr__(self) -> str:
        return f"MergedRestore(kept={self.kept!r}, ops={len(self.patch)})"


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _tokens(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not a JSON Pointer")
    return [_unescape(t) for t in path[1:].split("/")]


def _child(node: Any, token: str) -> Any:
    if isinstance(node, Mapping):
        return node.get(token, _MISSING)
    if isinstance(node, list) and token.isdigit() and int(token) < len(node):
        return node[int(token)]
    return _MISSING


def _get(doc: Any, tokens: Sequence[str]) -> Any:
    node = doc
    for token in tokens:
        node = _child(node, token)
        if node is _MISSING:
            return _MISSING
    return node


def _set(doc: Any, tokens: Sequence[str], value: Any) -> None:
    """Set (or, for ``_MISSING``, remove) the value at ``tokens``; parents must exist."""
    parent = _get(doc, tokens[:-1])
    key = tokens[-1]
    if isinstance(parent, dict):
        if value is _MISSING:
            parent.pop(key, None)
        else:
            parent[key] = value
    elif isinstance(parent, list) and key.isdigit() and int(key) < len(parent):
        parent[int(key)] = value  # list items are removed by value, see merge_restore


def _parent(doc: Any, tokens: Sequence[str]) -> Any:
    """The container of ``tokens``' last step; maps the record left out (stripped server fields,
    like an annotations map that held only the server's) are made empty."""
    node = doc
    for token in tokens[:-1]:
        child = _child(node, token)
        if child is _MISSING and isinstance(node, dict):
            child = node[token] = {}
        node = child
    return node


def _bridged(original: Mapping[str, Any], forward: Sequence[Mapping[str, Any]]) -> Any:
    """What the forward patch made of ``original`` (its add/replace operations; tests skipped)."""
    doc: Any = copy.deepcopy(dict(original))
    for op in forward:
        if op.get("op") not in ("add", "replace"):
            continue
        tokens = _tokens(str(op.get("path")))
        parent, key, value = _parent(doc, tokens), tokens[-1], copy.deepcopy(op.get("value"))
        if isinstance(parent, dict):
            parent[key] = value
        elif isinstance(parent, list) and key == "-":
            parent.append(value)
        elif isinstance(parent, list) and key.isdigit() and int(key) <= len(parent):
            if op["op"] == "add":
                parent.insert(int(key), value)
            elif int(key) < len(parent):
                parent[int(key)] = value
        else:
            raise ValueError(f"the forward patch's {op['op']} of {op.get('path')} does not fit the original")
    return doc


def _same(now: Any, ours: Any) -> bool:
    """Whether ``now`` is what the bridge set: equal, or with only fields the API server filled in
    (defaults like a probe's ``timeoutSeconds``), which the bridge's own value does not name."""
    if isinstance(ours, Mapping) and isinstance(now, Mapping):
        return all(key in now and _same(now[key], value) for key, value in ours.items())
    if isinstance(ours, list) and isinstance(now, list):
        return len(ours) == len(now) and all(_same(n, o) for n, o in zip(now, ours, strict=True))
    return bool(now == ours)


def _named(items: Any) -> dict[str, Any] | None:
    """A list of objects with unique names (env, ports, volumeMounts) by name; None for other lists."""
    if not isinstance(items, list) or not all(isinstance(i, Mapping) and isinstance(i.get("name"), str) for i in items):
        return None
    by_name = {i["name"]: i for i in items}
    return by_name if len(by_name) == len(items) else None


def _merge_named_list(current: list[Any], ours: Any, original: Any, path: str) -> tuple[list[Any], list[str]]:
    """Item by name: the original's item where the current one is ours, theirs where it is not."""
    now, set_by_us, was = _named(current) or {}, _named(ours) or {}, _named(original) or {}
    merged: list[Any] = []
    kept: list[str] = []
    for name, item in now.items():
        if name in set_by_us and _same(item, set_by_us[name]):
            if name in was:
                merged.append(copy.deepcopy(was[name]))
        else:
            merged.append(copy.deepcopy(item))
            kept.append(f"{path}[{name}]")
    for name, item in was.items():
        if name not in now and name not in set_by_us:  # the bridge took it out and nobody put it back
            merged.append(copy.deepcopy(item))
    return merged, kept


def _merge_mapping(
    current: Mapping[str, Any], ours: Mapping[str, Any], original: Any, path: str
) -> tuple[Any, list[str]]:
    """Key by key: the original where the current value is ours, theirs where it is not (lists of
    named items, like env, item by item)."""
    before = original if isinstance(original, Mapping) else {}
    merged: dict[str, Any] = {}
    kept: list[str] = []
    for key in [*current, *(k for k in before if k not in current)]:
        now, set_by_us, was = current.get(key, _MISSING), ours.get(key, _MISSING), before.get(key, _MISSING)
        if _same(now, set_by_us):
            pick = was
        elif _named(now) is not None and (set_by_us is _MISSING or _named(set_by_us) is not None):
            pick, theirs = _merge_named_list(now, set_by_us, was, f"{path}/{key}")
            kept += theirs
            if not pick and was is _MISSING:
                pick = _MISSING
        else:
            pick = now
            kept.append(f"{path}/{key}")
        if pick is not _MISSING:
            merged[key] = copy.deepcopy(pick)
    return merged, kept


def merge_restore(
    original: Mapping[str, Any], current: Mapping[str, Any], forward: Sequence[Mapping[str, Any]]
) -> MergedRestore:
    """The JSON Patch that turns ``current`` into ``original`` except where someone changed it.

    ``forward`` is the bridge's forward patch (its ``add``/``replace`` operations say what the
    bridge set where; ``test`` operations are ignored). ValueError for a malformed operation.
    """
    final = _bridged(original, forward)  # what the bridge left at each place, after all its operations
    desired: Any = copy.deepcopy(dict(current))
    kept: list[str] = []
    drop_from_lists: list[tuple[tuple[str, ...], Any]] = []
    for op in forward:
        if op.get("op") not in ("add", "replace"):
            continue
        path = str(op.get("path"))
        tokens = _tokens(path)
        ours = _get(final, tokens)
        parent = _get(current, tokens[:-1])
        if isinstance(parent, list) and op["op"] == "add":
            ours = op.get("value")
            # an item the bridge appended (its code volume): removed by value, wherever it is now
            drop_from_lists.append((tuple(tokens[:-1]), ours))
            continue
        now, was = _get(current, tokens), _get(original, tokens)
        if now is _MISSING:
            if was is not _MISSING:
                kept.append(f"{path} (removed)")
        elif _same(now, ours):
            _set(desired, tokens, was if was is _MISSING else copy.deepcopy(was))
        elif isinstance(now, Mapping) and isinstance(ours, Mapping):
            merged, theirs = _merge_mapping(now, ours, was, path)
            _set(desired, tokens, merged)
            kept += theirs
        elif isinstance(now, list) and isinstance(ours, list) and was is _MISSING:
            rest = [item for item in now if item not in ours]
            _set(desired, tokens, rest or _MISSING)
            if rest:
                kept.append(path)
        else:
            kept.append(path)
    for tokens_, item in drop_from_lists:
        items = _get(desired, tokens_)
        # by name too: the API server fills in defaults (a volume's defaultMode), so ours may not be equal
        name = item.get("name") if isinstance(item, Mapping) else None
        same = (
            [i for i in items if i == item or (name and isinstance(i, Mapping) and i.get("name") == name)]
            if (isinstance(items, list))
            else []
        )
        if same:
            items.remove(same[0])
            if not items and _get(original, tokens_) is _MISSING:
                _set(desired, list(tokens_), _MISSING)
    meta = current.get("metadata") or {}
    patch: list[dict[str, Any]] = []
    if "resourceVersion" in meta:
        patch.append({"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]})
    for tokens_w in _WRITTEN:
        now, then = _get(current, tokens_w), _get(desired, tokens_w)
        if now == then:
            continue
        pointer = "/" + "/".join(tokens_w)
        if then is _MISSING:
            patch.append({"op": "remove", "path": pointer})
        else:
            patch.append({"op": "add" if now is _MISSING else "replace", "path": pointer, "value": then})
    return MergedRestore(patch, kept)


def refused_as_invalid(status: Mapping[str, Any]) -> bool:
    """Whether a 422 says the object would be invalid (for good), not that a ``test`` failed (retry).

    The API server answers a failed JSON Patch ``test`` with reason Invalid and no causes; an
    invalid object comes with ``details.causes``.
    """
    details = status.get("details") or {}
    return bool(status.get("code") == 422 and isinstance(details, Mapping) and details.get("causes"))
