"""A distributed job's cluster (service/domain/cluster.py) and its replicas' names."""

from __future__ import annotations

import pytest

from service.domain import cluster
from service.domain.spec import JobSpec
from workers.steps import batch_servers

HOSTS = ["10.252.0.3", "10.252.0.7", "10.252.0.9"]


def test_tf_config_names_the_chief_then_the_workers_in_replica_order():
    want_cluster = {
        "chief": ["10.252.0.3:2222"],
        "worker": ["10.252.0.7:2223", "10.252.0.9:2224"],
    }
    assert cluster.tf_config(HOSTS, 0) == {
        "cluster": want_cluster,
        "task": {"type": "chief", "index": 0},
    }
    assert cluster.tf_config(HOSTS, 2)["task"] == {"type": "worker", "index": 1}
    assert cluster.tf_config(HOSTS[:1], 0) == {
        "cluster": {"chief": ["10.252.0.3:2222"]},
        "task": {"type": "chief", "index": 0},
    }
    assert [cluster.replica_name(i) for i in range(3)] == ["chief", "worker-1", "worker-2"]
    for bad in (-1, 3):
        with pytest.raises(ValueError):
            cluster.tf_config(HOSTS, bad)


def test_only_a_job_of_several_replicas_is_a_peer_group():
    assert cluster.peer_spec("job-1", 1) == {}
    assert cluster.peer_spec("job-1", 2) == {"peer_group": "job-1", "peer_ports": (2222, 2223)}
    # each replica its own port: replicas on one host's network (the emulator's) do not collide
    assert cluster.peer_spec("job-1", 3)["peer_ports"] == (2222, 2223, 2224)


def test_replica_rows_are_named_per_run_and_parse_back():
    assert batch_servers.name_of("job-1", 2) == "stackml-job-1-batch-2"
    assert batch_servers.name_of("job-1", 2, batch=False) == "stackml-job-1-worker-2"
    name = batch_servers.name_of("job-1", 2, batch=False, restarts=3)
    assert name == "stackml-job-1-r3-worker-2"
    assert batch_servers.worker_of(name) == 2
    spec = JobSpec.model_validate(
        {
            "name": "d",
            "trainer": {"package_uri": "local://projects/p/staging/x/p.tar.gz", "module": "t"},
            "resources": {"workers": 4},
        }
    )
    assert batch_servers.count(spec) == 4 and batch_servers.role_of(spec) == "worker"
    assert batch_servers.label(spec, 3) == "replica worker-3"


def test_replica_index_names_the_chief_and_the_workers_the_job_has() -> None:
    assert cluster.replica_index("chief", 1) == 0
    assert [cluster.replica_index(f"worker-{k}", 3) for k in (1, 2)] == [1, 2]
    for bad, servers in (("worker-3", 3), ("worker-0", 3), ("worker-01", 3), ("ps-0", 3)):
        with pytest.raises(ValueError, match=r"3 servers \(chief, worker-1 .. worker-2\)"):
            cluster.replica_index(bad, servers)
    with pytest.raises(ValueError, match=r"one server \(chief\)"):
        cluster.replica_index("worker-1", 1)
    with pytest.raises(ValueError) as e:
        cluster.replica_index("x" * 500, 2)
    assert len(str(e.value)) < 200  # a long name is cut in the message
