"""A distributed training job's cluster: its replicas, their TF_CONFIG, its peer group (no I/O).

A job with `resources.workers` W > 1 (or `resources.parameter_servers` P > 0, or
`resources.evaluator`) runs the trainer on one server per replica, in replica order:

- replica 0 is TF_CONFIG's `chief` (its model is exported, its checkpoints synced);
- replicas 1..W-1 are `worker` 0..W-2, named `worker-1`..`worker-<W-1>`;
- replicas W..W+P-1 are `ps` 0..P-1, named `ps-0`..`ps-<P-1>` (ParameterServerStrategy: the
  chief coordinates, the workers compute, the parameter servers hold the variables);
- with an evaluator, replica W+P is TF_CONFIG's `evaluator` 0, named `evaluator`: a side-car
  that evaluates the chief's checkpoints as they come, outside the cluster (its TF_CONFIG names
  itself alone; the others' do not name it).

Replica k listens on TF_PORT + k on its own server (distinct ports, so that replicas that share
one host's network, as the devcloud emulator's servers do, do not collide): the servers are one
peer group (the job's id), which the compute backend connects to each other on those ports alone
(an isolated sandbox's peer link, or a Neutron security group of the job's on OpenStack).
"""

from __future__ import annotations

from typing import Any, NamedTuple

TF_PORT = 2222
EVALUATOR = "evaluator"


class Shape(NamedTuple):
    """How many replicas of each kind a job has (JobSpec.shape())."""

    workers: int = 1  # the chief included
    parameter_servers: int = 0
    evaluator: bool = False

    @property
    def servers(self) -> int:
        return self.workers + self.parameter_servers + int(self.evaluator)

    @property
    def evaluator_index(self) -> int | None:
        return self.workers + self.parameter_servers if self.evaluator else None


def replica_name(index: int, shape: Shape | None = None) -> str:
    """`chief` for replica 0, `worker-<k>` for replica k < W, `ps-<k - W>` past them,
    `evaluator` for the side-car (STACKML_REPLICA, messages, `?replica=`). Without a shape,
    every replica but the chief is a worker."""
    if index == 0:
        return "chief"
    if shape is not None and index == shape.evaluator_index:
        return EVALUATOR
    if shape is not None and index >= shape.workers:
        return f"ps-{index - shape.workers}"
    return f"worker-{index}"


def role(index: int, shape: Shape) -> str:
    """TF_CONFIG's task type of replica `index`."""
    if index == 0:
        return "chief"
    if index == shape.evaluator_index:
        return EVALUATOR
    return "worker" if index < shape.workers else "ps"


def replica_index(name: str, shape: Shape) -> int:
    """The replica a log's `?replica=` names: 0 for `chief`, k for `worker-<k>` (1 <= k < W),
    W + j for `ps-<j>`, W + P for `evaluator`; ValueError, with what the job has, for any
    other name."""
    workers, ps = shape.workers, shape.parameter_servers
    if name == "chief":
        return 0
    if name == EVALUATOR and shape.evaluator_index is not None:
        return shape.evaluator_index
    k = _number(name.removeprefix("worker-")) if name.startswith("worker-") else None
    if k is not None and 1 <= k < workers:
        return k
    j = _number(name.removeprefix("ps-")) if name.startswith("ps-") else None
    if j is not None and j < ps:
        return workers + j
    have = ["chief"]
    if workers > 1:
        have.append("worker-1" if workers == 2 else f"worker-1 .. worker-{workers - 1}")
    if ps:
        have.append("ps-0" if ps == 1 else f"ps-0 .. ps-{ps - 1}")
    if shape.evaluator:
        have.append(EVALUATOR)
    servers = shape.servers
    what = "one server" if servers == 1 else f"{servers} servers"
    raise ValueError(
        f"replica {name[:40]!r} is not one of this job's: it runs on {what} ({', '.join(have)})"
    )


def _number(text: str) -> int | None:
    """A replica number as names write it: digits, no leading zero."""
    if text.isdigit() and (text == "0" or not text.startswith("0")):
        return int(text)
    return None


def tf_port(index: int) -> int:
    """The port replica `index` listens on for its peers."""
    return TF_PORT + index


def tf_config(peer_hosts: list[str], index: int, shape: Shape | None = None) -> dict[str, Any]:
    """TF_CONFIG of replica `index` of a cluster whose replicas are reached at `peer_hosts`
    (in replica order; by default all are the chief and its workers)."""
    if not 0 <= index < len(peer_hosts):
        raise ValueError(f"replica {index} is not one of {len(peer_hosts)}")
    s = shape or Shape(len(peer_hosts))
    if s.servers != len(peer_hosts) or s.workers < 1:
        raise ValueError(f"{len(peer_hosts)} replicas are not a cluster of {s}")
    addresses = [f"{h}:{tf_port(k)}" for k, h in enumerate(peer_hosts)]
    if index == s.evaluator_index:  # outside the cluster: it only reads checkpoints
        return {"cluster": {EVALUATOR: [addresses[index]]}, "task": {"type": EVALUATOR, "index": 0}}
    w, p = s.workers, s.parameter_servers
    cluster: dict[str, list[str]] = {"chief": addresses[:1]}
    if w > 1:
        cluster["worker"] = addresses[1:w]
    if p:
        cluster["ps"] = addresses[w : w + p]
    kind = role(index, s)
    task_index = {"chief": 0, "worker": index - 1, "ps": index - w}[kind]
    return {"cluster": cluster, "task": {"type": kind, "index": task_index}}


def peer_spec(job_id: str, replicas: int, index: int = 0) -> dict[str, Any]:
    """The ServerSpec fields that put replica `index`'s server in its job's peer group (none
    for one replica)."""
    if replicas <= 1:
        return {}
    return {
        "peer_group": job_id,
        "peer_ports": tuple(tf_port(k) for k in range(replicas)),
        "peer_index": index,
    }
