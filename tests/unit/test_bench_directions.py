"""The benchmarks name a transfer by where its data goes; the load tool's op depends on where the server is.

A mix-up here measured pod -> local while reporting local -> cluster once (bench.experiments hops,
which had its own copy of the translation); now the runner's LoadPath holds it and the
experiments' _transfer asks it. Both are pinned.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import experiments
from bench.runner import LoadPath


@pytest.mark.parametrize(
    ("server", "op", "direction"),
    [("local", "sink", "to local"), ("local", "source", "to cluster"),
     ("pod", "sink", "to cluster"), ("pod", "source", "to local")],
)  # fmt: skip
def test_a_load_path_names_where_the_data_goes(server: str, op: str, direction: str) -> None:
    path = LoadPath("p", "127.0.0.1", 1, server, False, "")
    assert path.direction(op) == direction
    assert path.op_for(direction) == op


@pytest.mark.parametrize(
    ("direction", "server_in_cluster", "op"),
    [("to-local", False, "sink"), ("to-cluster", False, "source"),
     ("to-cluster", True, "sink"), ("to-local", True, "source")],
)  # fmt: skip
def test_an_experiment_transfer_picks_the_op_for_its_server(
    monkeypatch: pytest.MonkeyPatch, direction: str, server_in_cluster: bool, op: str
) -> None:
    seen: list[tuple[str, ...]] = []

    def load(*args: str) -> dict[str, Any]:
        seen.append(args)
        return {}

    monkeypatch.setattr(experiments, "_load", load)
    experiments._transfer("127.0.0.1", 1, direction, 1024, server_in_cluster=server_in_cluster)
    assert seen[0][seen[0].index("--op") + 1] == op
