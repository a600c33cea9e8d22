"""Node-loss detection from Ray's node table, with the table and the clock injected (no Ray)."""

from __future__ import annotations

from tierflow.cache.settings import CacheSettings
from tierflow.engine.nodes import NODE_TABLE_TTL_S, NODES_REFRESH_S, NodeWatcher


def test_a_node_gone_from_the_table_is_reported_once_and_reads_are_shared() -> None:
    table = {"A": {"CPU": 2.0, "GPU": 1.0}, "B": {"CPU": 4.0}}
    reads: list[int] = []
    now = [100.0]

    def read() -> dict[str, dict[str, float]]:
        reads.append(1)
        return dict(table)

    w = NodeWatcher(CacheSettings(root="/tmp/unused"), read_table=read, clock=lambda: now[0])
    w.nodes = {"A", "B"}
    assert w.alive() == {"A": 2.0, "B": 4.0} and w.resources()["A"]["GPU"] == 1.0
    assert len(reads) == 1  # one driver round's decisions share one read of the table
    del table["B"]
    assert w.lost() == []  # not looked at before NODES_REFRESH_S
    now[0] += NODES_REFRESH_S + 0.01
    assert w.lost() == ["B"] and w.nodes == {"A"}
    now[0] += NODES_REFRESH_S + 0.01
    assert w.lost() == []  # reported once
    assert len(reads) == 3  # once per look
    assert "B" not in w.alive(fresh=True) and len(reads) == 4
    w.alive()
    assert len(reads) == 4  # within NODE_TABLE_TTL_S: the same read
    now[0] += NODE_TABLE_TTL_S
    w.alive()
    assert len(reads) == 5
