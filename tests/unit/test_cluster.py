"""A distributed job's cluster (service/domain/cluster.py) and its replicas' names."""

from __future__ import annotations

import pytest

from service.domain import cluster
from service.domain.spec import JobSpec
from tests.unit.test_spec import BATCH
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
    assert cluster.peer_spec("job-1", 2) == {
        "peer_group": "job-1",
        "peer_ports": (2222, 2223),
        "peer_index": 0,
    }
    # each replica its own port: replicas on one host's network (the emulator's) do not collide
    assert cluster.peer_spec("job-1", 3)["peer_ports"] == (2222, 2223, 2224)
    # and its index: where a backend keeps peer addresses stable, a replacement gets the same
    assert cluster.peer_spec("job-1", 3, 2)["peer_index"] == 2


def test_tf_config_with_parameter_servers_names_them_after_the_workers():
    hosts = ["10.252.0.1", "10.252.0.2", "10.252.0.3", "10.252.0.4"]
    want = {
        "chief": ["10.252.0.1:2222"],
        "worker": ["10.252.0.2:2223", "10.252.0.3:2224"],
        "ps": ["10.252.0.4:2225"],
    }
    shape = cluster.Shape(3, 1)
    tasks = [cluster.tf_config(hosts, k, shape)["task"] for k in range(4)]
    assert cluster.tf_config(hosts, 0, shape)["cluster"] == want
    assert tasks == [
        {"type": "chief", "index": 0},
        {"type": "worker", "index": 0},
        {"type": "worker", "index": 1},
        {"type": "ps", "index": 0},
    ]
    names = [cluster.replica_name(k, shape) for k in range(4)]
    assert names == ["chief", "worker-1", "worker-2", "ps-0"]
    assert [cluster.replica_index(n, shape) for n in names] == [0, 1, 2, 3]
    for bad in ("ps-1", "ps-01", "worker-3", "ps-", "evaluator"):
        with pytest.raises(ValueError, match=r"4 servers \(chief, worker-1 .. worker-2, ps-0\)"):
            cluster.replica_index(bad, shape)
    for bad_shape in (cluster.Shape(0, 4), cluster.Shape(3, 2), cluster.Shape(2, 1)):
        with pytest.raises(ValueError):
            cluster.tf_config(hosts, 0, bad_shape)


def test_the_evaluator_is_last_and_outside_the_cluster():
    hosts = ["10.252.0.1", "10.252.0.2", "10.252.0.3"]
    shape = cluster.Shape(2, 0, evaluator=True)
    assert shape.servers == 3 and shape.evaluator_index == 2
    # the chief and the worker do not name it; it names itself alone
    assert cluster.tf_config(hosts, 0, shape)["cluster"] == {
        "chief": ["10.252.0.1:2222"],
        "worker": ["10.252.0.2:2223"],
    }
    assert cluster.tf_config(hosts, 2, shape) == {
        "cluster": {"evaluator": ["10.252.0.3:2224"]},
        "task": {"type": "evaluator", "index": 0},
    }
    assert [cluster.replica_name(k, shape) for k in range(3)] == ["chief", "worker-1", "evaluator"]
    assert cluster.replica_index("evaluator", shape) == 2
    with pytest.raises(ValueError, match=r"\(chief, worker-1\)"):
        cluster.replica_index("evaluator", cluster.Shape(2))
    name = batch_servers.name_of("job-1", 2, batch=False, shape=shape)
    assert name == "stackml-job-1-evaluator-0" and batch_servers.worker_of(name, shape) == 2
    with_ps = cluster.Shape(3, 2, evaluator=True)
    assert batch_servers.worker_of("stackml-job-1-r2-evaluator-0", with_ps) == 5
    assert batch_servers.worker_of("stackml-job-1-evaluator-0") is None  # no shape: not a worker


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
    # a parameter server: named by its own index, read back past the workers
    ps = spec.model_copy(
        update={"resources": spec.resources.model_copy(update={"parameter_servers": 2})}
    )
    assert batch_servers.count(ps) == 6 and batch_servers.role_of(ps, 5) == "ps"
    name = batch_servers.name_of("job-1", 5, batch=False, restarts=1, shape=ps.shape())
    assert name == "stackml-job-1-r1-ps-1" and batch_servers.worker_of(name, ps.shape()) == 5
    assert batch_servers.label(ps, 4) == "replica ps-0"
    assert batch_servers.worker_of("stackml-job-1-batch-3") == 3


def test_replica_index_names_the_chief_and_the_workers_the_job_has() -> None:
    assert cluster.replica_index("chief", cluster.Shape(1)) == 0
    three = cluster.Shape(3)
    assert [cluster.replica_index(f"worker-{k}", three) for k in (1, 2)] == [1, 2]
    for bad in ("worker-3", "worker-0", "worker-01", "ps-0"):
        with pytest.raises(ValueError, match=r"3 servers \(chief, worker-1 .. worker-2\)"):
            cluster.replica_index(bad, three)
    with pytest.raises(ValueError, match=r"one server \(chief\)"):
        cluster.replica_index("worker-1", cluster.Shape(1))
    with pytest.raises(ValueError) as e:
        cluster.replica_index("x" * 500, cluster.Shape(2))
    assert len(str(e.value)) < 200  # a long name is cut in the message


def test_a_batch_jobs_servers_are_its_workers() -> None:
    """A batch job spread over prediction.max_workers servers: `?replica=worker-<k>` names
    them (CI caught a shape read from resources.workers, which a batch job leaves at 1)."""
    spec = JobSpec.model_validate(
        {**BATCH, "prediction": {**BATCH["prediction"], "max_workers": 3}}
    )
    assert spec.shape() == cluster.Shape(3) and spec.servers() == 3
    assert cluster.replica_index("worker-2", spec.shape()) == 2
    assert batch_servers.label(spec, 2) == "batch worker 2"
