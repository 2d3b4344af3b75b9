"""Nova's response shapes by microversion (nova/api/openstack/compute/views, api_samples)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from flask import request

from devcloud.emulator.auth import Context
from devcloud.emulator.catalog import PRIVATE_NET, PUBLIC_NET, FlavorDef, stable_id
from devcloud.emulator.state import State
from devcloud.emulator.wire import Microversion, isotime

NETWORK_NAMES = {stable_id("network", n): n for n in (PRIVATE_NET, PUBLIC_NET)}


def compute_base() -> str:
    return request.host_url.rstrip("/") + "/compute"


def links(kind: str, ident: str) -> list[dict[str, str]]:
    base = compute_base()
    return [
        {"href": f"{base}/v2.1/{kind}/{ident}", "rel": "self"},
        {"href": f"{base}/{kind}/{ident}", "rel": "bookmark"},
    ]


def flavor_view(f: FlavorDef, mv: Microversion, detail: bool) -> dict[str, Any]:
    view: dict[str, Any] = {"id": f.id, "name": f.name, "links": links("flavors", f.id)}
    if mv >= (2, 55):
        view["description"] = f.description
    if detail:
        view.update(
            {
                "ram": f.ram,
                "vcpus": f.vcpus,
                "disk": f.disk,
                "OS-FLV-EXT-DATA:ephemeral": f.ephemeral,
                "swap": f.swap if (f.swap or mv >= (2, 75)) else "",
                "OS-FLV-DISABLED:disabled": False,
                "os-flavor-access:is_public": True,
                "rxtx_factor": 1.0,
            }
        )
        if mv >= (2, 61):
            view["extra_specs"] = dict(f.extra_specs)
    return view


def fingerprint(public_key: str) -> str:
    """Nova's keypair fingerprint: MD5 of the key blob, colon-separated."""
    blob = base64.b64decode(public_key.split()[1])
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


def keypair_view(kp: dict[str, Any], mv: Microversion, *, full: bool) -> dict[str, Any]:
    view: dict[str, Any] = {
        "name": kp["name"],
        "public_key": kp["public_key"],
        "fingerprint": kp["fingerprint"],
    }
    if mv >= (2, 2):
        view["type"] = kp["type"]
    if full:
        view.update(
            user_id=kp["user_id"],
            id=kp["id"],
            created_at=isotime(kp["created_at"], z=False),
            deleted=False,
            deleted_at=None,
            updated_at=None,
        )
    return view


def addresses(state: State, srv: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    nets = NETWORK_NAMES
    for port in state["ports"].values():
        if port["device_id"] != srv["id"]:
            continue
        entries = out.setdefault(nets.get(port["network_id"], port["network_id"]), [])
        for ip in port["fixed_ips"]:
            entries.append(
                {
                    "addr": ip["ip_address"],
                    "version": 4,
                    "OS-EXT-IPS:type": "fixed",
                    "OS-EXT-IPS-MAC:mac_addr": port["mac_address"],
                }
            )
        for fip in state["floatingips"].values():
            if fip["port_id"] == port["id"]:
                entries.append(
                    {
                        "addr": fip["floating_ip_address"],
                        "version": 4,
                        "OS-EXT-IPS:type": "floating",
                        "OS-EXT-IPS-MAC:mac_addr": port["mac_address"],
                    }
                )
    return out


def server_view(
    state: State, srv: dict[str, Any], mv: Microversion, ctx: Context
) -> dict[str, Any]:
    sid = srv["id"]
    f = srv["flavor"]
    if mv >= (2, 47):
        flavor: dict[str, Any] = {
            "vcpus": f["vcpus"],
            "ram": f["ram"],
            "disk": f["disk"],
            "ephemeral": f["ephemeral"],
            "swap": f["swap"],
            "original_name": f["name"],
            "extra_specs": dict(f["extra_specs"]),
        }
    else:
        flavor = {"id": f["id"], "links": links("flavors", f["id"])[1:]}
    host_id = hashlib.sha224((srv["project_id"] + "emulator").encode()).hexdigest()
    view: dict[str, Any] = {
        "id": sid,
        "name": srv["name"],
        "status": srv["status"],
        "tenant_id": srv["project_id"],
        "user_id": srv["user_id"],
        "metadata": dict(srv["metadata"]),
        "hostId": host_id if srv.get("sandbox_id") else "",
        "image": {"id": srv["image_id"], "links": links("images", srv["image_id"])[1:]},
        "flavor": flavor,
        "created": isotime(srv["created"]),
        "updated": isotime(srv["updated"]),
        "addresses": addresses(state, srv),
        "accessIPv4": "",
        "accessIPv6": "",
        "links": links("servers", sid),
        "OS-DCF:diskConfig": "MANUAL",
        "progress": srv.get("progress", 0),
        "OS-EXT-AZ:availability_zone": srv["availability_zone"],
        "config_drive": "",
        "key_name": srv["key_name"],
        "OS-SRV-USG:launched_at": isotime(srv.get("launched_at"), z=False),
        "OS-SRV-USG:terminated_at": None,
        "OS-EXT-STS:task_state": srv.get("task_state"),
        "OS-EXT-STS:vm_state": srv["vm_state"],
        "OS-EXT-STS:power_state": srv.get("power_state", 0),
        "os-extended-volumes:volumes_attached": [],
    }
    if srv.get("port_id"):
        view["security_groups"] = [{"name": n} for n in srv["security_groups"]]
    if srv.get("fault") and srv["status"] in ("ERROR", "DELETED"):
        fault = srv["fault"]
        view["fault"] = {
            "code": fault["code"],
            "created": isotime(fault["created"]),
            "message": fault["message"],
        }
        if ctx.is_admin:
            view["fault"]["details"] = fault.get("details", "")
    if ctx.is_admin or mv >= (2, 90):
        view["OS-EXT-SRV-ATTR:hostname"] = srv["hostname"]
    if ctx.is_admin:
        attached = bool(srv.get("sandbox_id"))
        view.update(
            {
                "OS-EXT-SRV-ATTR:host": "emulator" if attached else None,
                "OS-EXT-SRV-ATTR:hypervisor_hostname": "emulator" if attached else None,
                "OS-EXT-SRV-ATTR:instance_name": f"instance-{srv['seq']:08x}",
            }
        )
    if mv >= (2, 9):
        view["locked"] = False
    if mv >= (2, 19):
        view["description"] = srv.get("description")
    if mv >= (2, 26):
        view["tags"] = list(srv["tags"])
    if mv >= (2, 63):
        view["trusted_image_certificates"] = None
    if mv >= (2, 71):
        view["server_groups"] = []
    if mv >= (2, 73):
        view["locked_reason"] = None
    if mv >= (2, 96):
        view["pinned_availability_zone"] = srv.get("requested_az")
    if mv >= (2, 100):
        view["scheduler_hints"] = {}
    return view
