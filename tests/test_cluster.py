"""The receiver's stage on Ray: consistent hashing of nodes over workers (with numbers), and with
real Ray actors on a local cluster, real ZeroMQ publishers on loopback and the real ``jsonl``
task: per-node order, per-worker and total counts, a killed worker's nodes taken over within
2 s, and every frame set sent either completed or counted."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from receiver_fixtures import (
    connected_publisher,
    make_tiny_model,
    save_tiny_model,
    wait_until,
    wire,
)

from mvld.common.errors import ConfigError
from mvld.receiver.cluster import ClusterError, NodeRing, format_cluster_status
from mvld.receiver.config import ReceiverConfig

NODE_IDS = [f"edge-{i:05d}" for i in range(10_000)]


def _owners(ring: NodeRing) -> dict[str, str]:
    return {node: ring.owner(node) for node in NODE_IDS}


def test_ring_spreads_nodes_fairly_and_deterministically() -> None:
    ring = NodeRing([f"worker-{i}" for i in range(4)])
    owners = _owners(ring)
    shares = {w: sum(o == w for o in owners.values()) / len(NODE_IDS) for w in ring.workers}
    assert all(0.20 <= share <= 0.30 for share in shares.values()), shares  # 1/4 each, +-20%
    assert _owners(NodeRing(reversed(ring.workers))) == owners, "order of joining is irrelevant"


def test_adding_a_worker_moves_only_a_fair_share_to_it() -> None:
    ring = NodeRing([f"worker-{i}" for i in range(4)])
    before = _owners(ring)
    ring.add("worker-4")
    after = _owners(ring)
    moved = [node for node in NODE_IDS if before[node] != after[node]]
    assert 0.15 <= len(moved) / len(NODE_IDS) <= 0.25, len(moved)  # 1/5 expected
    assert {after[node] for node in moved} == {"worker-4"}, "no node moves between old workers"


def test_removing_a_worker_moves_only_its_nodes_spread_over_the_rest() -> None:
    ring = NodeRing([f"worker-{i}" for i in range(4)])
    before = _owners(ring)
    ring.remove("worker-1")
    after = _owners(ring)
    moved = [node for node in NODE_IDS if before[node] != after[node]]
    assert set(moved) == {node for node in NODE_IDS if before[node] == "worker-1"}
    takers = {w: sum(after[node] == w for node in moved) / len(moved) for w in ring.workers}
    assert set(takers) == {"worker-0", "worker-2", "worker-3"}
    assert all(0.2 <= share <= 0.47 for share in takers.values()), takers  # 1/3 each


def test_ring_misuse_is_an_error() -> None:
    ring = NodeRing(["a"])
    with pytest.raises(ValueError, match="already"):
        ring.add("a")
    ring.remove("a")
    with pytest.raises(ValueError, match="not on the ring"):
        ring.remove("a")
    with pytest.raises(ClusterError, match="no worker"):
        ring.owner("edge-1")


def test_cluster_flags_are_validated() -> None:
    with pytest.raises(ConfigError, match="--workers"):
        ReceiverConfig(workers=-1)
    with pytest.raises(ConfigError, match="--ray"):
        ReceiverConfig(ray_address=" ")


def test_missing_ray_is_one_line_naming_the_extra() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from mvld.receiver.cli import main\n"
        "sys.exit(main(['--workers', '2', '--bind', 'tcp://127.0.0.1:0']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'mvld[cluster]'" in done.stderr
    assert "Traceback" not in done.stderr


# -- real Ray ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """One local Ray per module (starting one takes seconds); the services reuse it."""
    ray = pytest.importorskip(
        "ray", reason="the cluster extra is not installed: pip install 'mvld[cluster]'"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_worker_niceness", "0")  # as the service's own local Ray does
        ray.init(
            num_cpus=3,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=200 * 1024**2,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cluster-model"))


def _nodes_per_worker(workers: int, each: int) -> list[str]:
    """Node ids, ``each`` owned by every one of ``workers`` workers (named as the service
    names them), so every worker has work."""
    ring = NodeRing([f"worker-{i}" for i in range(workers)])
    chosen: dict[str, list[str]] = {worker: [] for worker in ring.workers}
    for node in NODE_IDS:
        owned = chosen[ring.owner(node)]
        if len(owned) < each:
            owned.append(node)
    return [node for owned in chosen.values() for node in owned]


def _service(model_path: Path, workers: int, jsonl: Path, **overrides: object):
    from mvld.receiver.cluster import ClusterReceiverService

    config = ReceiverConfig(
        bind=("tcp://127.0.0.1:0",),
        gpu=-1,
        model=str(model_path),
        workers=workers,
        tasks=(f"jsonl:path={jsonl}",),
        max_rate=0,
        max_age_ms=60_000.0,
        threads=1,
        **overrides,
    )
    return ClusterReceiverService(config)


class Stream:
    """One real publisher per node, each sending frame sets (camera 1 failed) at ``rate_hz``
    from a thread; counts what it handed to ZeroMQ.

    Each node's first frame set is sent alone and awaited: a receiver cannot count losses
    before a node's first frame set it sees (a node may join mid-stream), later ones it counts
    as sequence gaps.
    """

    def __init__(self, stack: ExitStack, service: Any, nodes: list[str], rate_hz: float) -> None:
        self.model = make_tiny_model()  # same seed as the saved model: same fingerprint
        endpoint = service.endpoints[0]
        self.publishers = {
            node: stack.enter_context(connected_publisher(endpoint)) for node in nodes
        }
        self.rate_hz, self.sent = rate_hz, 0
        self.seq = dict.fromkeys(nodes, 0)
        before = service.metrics.received.value()
        for node, publisher in self.publishers.items():
            assert publisher.send(wire(self.model, node, 0))
            self.seq[node], self.sent = 1, self.sent + 1
        wait_until(
            lambda: service.metrics.received.value() - before == len(nodes),
            10,
            "the first frame set of every node",
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        while not self._stop.is_set():
            tick = time.monotonic()
            for node, publisher in self.publishers.items():
                if publisher.send(wire(self.model, node, self.seq[node])):
                    self.sent += 1
                self.seq[node] += 1
            self._stop.wait(max(0.0, period - (time.monotonic() - tick)))

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _accounts(service, stream: Stream) -> dict[str, float]:
    metrics = service.metrics
    return {
        "sent": stream.sent,
        "received": metrics.received.value(),
        "seq_gaps": metrics.seq_gaps.value(),
        "completed": metrics.completed.value(),
        "withheld": metrics.withheld.value(reason="no_observed_view"),
        "dropped": sum(metrics.drops().values()),
        "backlog": len(service.backlog),
    }


def _settle(service, stream: Stream, timeout_s: float = 20.0) -> dict[str, float]:
    """Wait until every frame set handed to ZeroMQ reached the receiver or is a counted
    sequence gap, and every one received is completed, withheld or dropped with a reason."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = _accounts(service, stream)
        if (
            counts["received"] + counts["seq_gaps"] == counts["sent"]
            and counts["completed"] + counts["withheld"] + counts["dropped"] == counts["received"]
        ):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(
                f"frame sets unaccounted for after {timeout_s} s: {counts}, "
                f"drops {service.metrics.drops()}"
            )
        time.sleep(0.05)


def _seqs_by_node(jsonl: Path) -> dict[str, list[int]]:
    by_node: dict[str, list[int]] = {}
    for line in jsonl.read_text().splitlines():
        summary = json.loads(line)
        by_node.setdefault(summary["node"], []).append(summary["seq"])
    return by_node


def test_each_node_goes_to_its_owner_in_order_and_counts_add_up(
    ray_cluster: Any, model_path: Path, tmp_path: Path
) -> None:
    jsonl = tmp_path / "results.jsonl"
    nodes = _nodes_per_worker(2, 3)
    service = _service(model_path, 2, jsonl)
    with ExitStack() as stack:
        stack.enter_context(service)
        with Stream(stack, service, nodes, rate_hz=8) as stream:
            wait_until(lambda: service.metrics.completed.value() >= 40, 30, "40 frame sets")
        _settle(service, stream)
        status = service.status(1.0, 0)
    by_node = _seqs_by_node(jsonl)  # the workers' tasks wrote it; closed and flushed now
    assert set(by_node) == set(nodes)
    for node, seqs in by_node.items():
        assert seqs == sorted(set(seqs)), f"{node}: out of order or repeated: {seqs}"
    assert sum(len(s) for s in by_node.values()) == service.metrics.completed.value()
    assert {node: worker for node, (worker, _) in service.node_workers().items()} == {
        node: service.ring.owner(node) for node in nodes
    }, "each node stays with its owner"
    per_worker = {name: w["completed"] for name, w in status["workers"].items()}
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    assert sum(per_worker.values()) == status["completed"]
    assert service.metrics.views.value(provenance="imputed") == status["completed"]
    assert "worker-0" in format_cluster_status(status)


def test_a_killed_workers_nodes_are_taken_over_within_2_s_and_nothing_is_lost_uncounted(
    ray_cluster: Any, model_path: Path, tmp_path: Path
) -> None:
    jsonl = tmp_path / "results.jsonl"
    nodes = _nodes_per_worker(3, 3)
    service = _service(model_path, 3, jsonl)
    with ExitStack() as stack:
        stack.enter_context(service)
        owners = {node: service.ring.owner(node) for node in nodes}
        victim = max(service.workers, key=lambda w: sum(o == w for o in owners.values()))
        orphans = [node for node, owner in owners.items() if owner == victim]
        assert orphans, owners
        with Stream(stack, service, nodes, rate_hz=6) as stream:
            wait_until(lambda: set(service.node_workers()) == set(nodes), 30, "every node served")
            killed_at = time.monotonic()
            ray_cluster.kill(service._workers[victim].actor)

            def taken_over() -> bool:
                seen = service.node_workers()
                return all(seen[node][0] != victim for node in orphans)

            wait_until(taken_over, 10, "the victim's nodes served by the others")
            takeover_s = time.monotonic() - killed_at
            time.sleep(1.0)
        _settle(service, stream)
        lost = service.metrics.drops().get("worker_lost", 0)
    assert takeover_s < 2.0, f"takeover took {takeover_s:.2f} s"
    assert victim not in service.workers and len(service.workers) == 2
    assert service.cluster_metrics.lost.value(worker=victim) == 1
    assert service.cluster_metrics.dropped.value(worker=victim, reason="worker_lost") == lost
    for node, seqs in _seqs_by_node(jsonl).items():
        assert seqs == sorted(set(seqs)), f"{node}: out of order or repeated: {seqs}"
    print(f"takeover {takeover_s:.3f} s, {lost} frame set(s) counted worker_lost")
