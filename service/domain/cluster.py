"""A distributed training job's cluster: its replicas, their TF_CONFIG, its peer group (no I/O).

A job with `resources.workers` W > 1 runs the trainer on W servers. Replica 0 is TF_CONFIG's
`chief` (its model is exported, its checkpoints synced); replicas 1..W-1 are `worker` 0..W-2.
Replica k listens on TF_PORT + k on its own server (distinct ports, so that replicas that share
one host's network, as the devcloud emulator's servers do, do not collide): the servers are one
peer group (the job's id), which the compute backend connects to each other on those ports alone
(an isolated sandbox's peer link, or a Neutron security group of the job's on OpenStack).
"""

from __future__ import annotations

from typing import Any

TF_PORT = 2222


def replica_name(index: int) -> str:
    """`chief` for replica 0, `worker-<k>` for replica k (STACKML_REPLICA, messages)."""
    return "chief" if index == 0 else f"worker-{index}"


def replica_index(name: str, servers: int) -> int:
    """The replica a log's `?replica=` names: 0 for `chief`, k for `worker-<k>` (1 <= k <
    servers); ValueError, with what the job has, for any other name."""
    if name == "chief":
        return 0
    k = name.removeprefix("worker-")
    if k != name and k.isdigit() and not k.startswith("0") and int(k) < servers:
        return int(k)
    have = "chief" if servers == 1 else f"chief, worker-1 .. worker-{servers - 1}"
    what = "one server" if servers == 1 else f"{servers} servers"
    raise ValueError(f"replica {name[:40]!r} is not one of this job's: it runs on {what} ({have})")


def tf_port(index: int) -> int:
    """The port replica `index` listens on for its peers."""
    return TF_PORT + index


def tf_config(peer_hosts: list[str], index: int) -> dict[str, Any]:
    """TF_CONFIG of replica `index` of a cluster whose replicas are reached at `peer_hosts`
    (in replica order)."""
    if not 0 <= index < len(peer_hosts):
        raise ValueError(f"replica {index} is not one of {len(peer_hosts)}")
    cluster: dict[str, list[str]] = {"chief": [f"{peer_hosts[0]}:{tf_port(0)}"]}
    if len(peer_hosts) > 1:
        cluster["worker"] = [f"{h}:{tf_port(k)}" for k, h in enumerate(peer_hosts) if k]
    task = {"type": "chief", "index": 0} if index == 0 else {"type": "worker", "index": index - 1}
    return {"cluster": cluster, "task": task}


def peer_spec(job_id: str, replicas: int) -> dict[str, Any]:
    """The ServerSpec fields that put a server in its job's peer group (none for one replica)."""
    if replicas <= 1:
        return {}
    return {"peer_group": job_id, "peer_ports": tuple(tf_port(k) for k in range(replicas))}
