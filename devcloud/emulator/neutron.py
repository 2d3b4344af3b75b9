"""Neutron's networking API v2.0, the subset openstacksdk calls for a stackml server.

Two fixed networks: `private` (subnet 127.77.0.0/16: each server's port carries its sandbox's
loopback address) and the external `public` (127.78.0.0/16). Ports are made by the emulated
Nova; security groups and rules are stored (a `default` group per project, as Neutron makes
one) but filter nothing: sandboxes listen on loopback. Floating IPs are created on `public`;
one created with a `port_id` takes the port's fixed address as its floating address (there is
no NAT on loopback, so that is the address that reaches the server); one created without a
port gets an unreachable 127.78.x.y.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from typing import TYPE_CHECKING, Any

from flask import Blueprint, g, request

from devcloud.emulator.catalog import PRIVATE_CIDR, PRIVATE_NET, PUBLIC_CIDR, PUBLIC_NET, stable_id
from devcloud.emulator.state import State
from devcloud.emulator.wire import ApiError, isotime, json_body

if TYPE_CHECKING:
    from devcloud.emulator.app import Emulator

ROUTER_ID = stable_id("router", "router1")
RESOURCES = (
    "networks",
    "subnets",
    "ports",
    "floatingips",
    "security-groups",
    "security-group-rules",
)


def _stamp(obj: dict[str, Any]) -> dict[str, Any]:
    """Neutron's standard attributes, rendered."""
    out = dict(obj)
    for key in ("created_at", "updated_at"):
        if isinstance(out.get(key), int | float):
            out[key] = isotime(out[key])
    out.setdefault("tags", [])
    out.setdefault("revision_number", 1)
    if "project_id" in out:
        out["tenant_id"] = out["project_id"]
    return out


def networks() -> list[dict[str, Any]]:
    made = 1_700_000_000.0
    out = []
    for name, external, cidr in (
        (PRIVATE_NET, False, PRIVATE_CIDR),
        (PUBLIC_NET, True, PUBLIC_CIDR),
    ):
        out.append(
            {
                "id": stable_id("network", name),
                "name": name,
                "status": "ACTIVE",
                "admin_state_up": True,
                "shared": True,
                "router:external": external,
                "subnets": [stable_id("subnet", name)],
                "project_id": "admin",
                "mtu": 1500,
                "description": "",
                "availability_zones": ["nova"],
                "ipv4_address_scope": None,
                "ipv6_address_scope": None,
                "port_security_enabled": True,
                "is_default": external,
                "created_at": made,
                "updated_at": made,
                "_cidr": cidr,
            }
        )
    return out


def subnets() -> list[dict[str, Any]]:
    out = []
    for net in networks():
        cidr = ipaddress.ip_network(net["_cidr"])
        out.append(
            {
                "id": net["subnets"][0],
                "name": f"{net['name']}-subnet",
                "network_id": net["id"],
                "ip_version": 4,
                "cidr": str(cidr),
                "gateway_ip": None,
                "enable_dhcp": True,
                "allocation_pools": [{"start": str(cidr[1]), "end": str(cidr[-2])}],
                "dns_nameservers": [],
                "host_routes": [],
                "project_id": "admin",
                "description": "",
                "created_at": net["created_at"],
                "updated_at": net["updated_at"],
            }
        )
    return out


def _rule(sg_id: str, project: str, direction: str, ethertype: str, **kw: Any) -> dict[str, Any]:
    now = time.time()
    return {
        "id": str(uuid.uuid4()),
        "security_group_id": sg_id,
        "project_id": project,
        "direction": direction,
        "ethertype": ethertype,
        "protocol": kw.get("protocol"),
        "port_range_min": kw.get("port_range_min"),
        "port_range_max": kw.get("port_range_max"),
        "remote_ip_prefix": kw.get("remote_ip_prefix"),
        "remote_group_id": kw.get("remote_group_id"),
        "remote_address_group_id": None,
        "normalized_cidr": kw.get("remote_ip_prefix"),
        "description": kw.get("description") or "",
        "belongs_to_default_sg": kw.get("default", False),
        "created_at": now,
        "updated_at": now,
    }


def _new_group(st: State, project: str, name: str, description: str) -> dict[str, Any]:
    now = time.time()
    sg: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "name": name,
        "description": description,
        "project_id": project,
        "stateful": True,
        "shared": False,
        "created_at": now,
        "updated_at": now,
    }
    st["security_groups"][sg["id"]] = sg
    for ethertype in ("IPv4", "IPv6"):  # Neutron gives every group egress to anywhere
        r = _rule(sg["id"], project, "egress", ethertype)
        st["security_group_rules"][r["id"]] = r
    return sg


def ensure_default_security_group(st: State, project: str) -> None:
    """Neutron makes a project's `default` group the first time the project is seen."""
    if any(
        sg["project_id"] == project and sg["name"] == "default"
        for sg in st["security_groups"].values()
    ):
        return
    sg = _new_group(st, project, "default", "Default security group")
    for ethertype in ("IPv4", "IPv6"):
        r = _rule(sg["id"], project, "ingress", ethertype, remote_group_id=sg["id"], default=True)
        st["security_group_rules"][r["id"]] = r


def _filter(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Neutron's list filters: each query parameter names an attribute; repeated = any of."""
    out = items
    for key in set(request.args):
        if key in ("fields", "limit", "marker", "sort_key", "sort_dir", "page_reverse"):
            continue
        wanted = request.args.getlist(key)
        if key in ("tags", "tags-any", "not-tags", "not-tags-any"):
            tags = {t for v in wanted for t in v.split(",")}
            if key == "tags":
                out = [i for i in out if tags <= set(i.get("tags", []))]
            elif key == "tags-any":
                out = [i for i in out if tags & set(i.get("tags", []))]
            elif key == "not-tags":
                out = [i for i in out if not tags <= set(i.get("tags", []))]
            else:
                out = [i for i in out if not tags & set(i.get("tags", []))]
            continue
        attr = "project_id" if key == "tenant_id" else key
        out = [i for i in out if attr in i and _matches(i[attr], wanted)]
    return out


def _matches(value: Any, wanted: list[str]) -> bool:
    if isinstance(value, bool):  # Neutron takes true/True/TRUE for booleans
        return ("true" if value else "false") in {w.lower() for w in wanted}
    return ("" if value is None else str(value)) in wanted


def blueprint(emu: Emulator) -> Blueprint:
    bp = Blueprint("neutron", __name__, url_prefix="/network/v2.0")
    store = emu.store

    def visible(obj: dict[str, Any]) -> bool:
        return bool(g.ctx.is_admin or obj.get("project_id") in (g.ctx.project_id, None))

    def listing(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        visible_items = [i for i in items if visible(i) or i.get("shared")]
        return {kind: [_stamp(_public(i)) for i in _filter(visible_items)]}

    def not_found(kind: str, ident: str) -> ApiError:
        names = {
            "networks": ("NetworkNotFound", f"Network {ident} could not be found."),
            "subnets": ("SubnetNotFound", f"Subnet {ident} could not be found."),
            "ports": ("PortNotFound", f"Port {ident} could not be found."),
            "floatingips": ("FloatingIPNotFound", f"Floating IP {ident} could not be found"),
            "security_groups": ("SecurityGroupNotFound", f"Security group {ident} does not exist"),
            "security_group_rules": (
                "SecurityGroupRuleNotFound",
                f"Security group rule {ident} does not exist",
            ),
        }
        kind_name, message = names[kind]
        return ApiError(404, message, neutron_type=kind_name)

    # ---------------------------------------------------------------- networks, subnets

    @bp.get("/networks")
    def list_networks() -> Any:
        return listing("networks", networks())

    @bp.get("/networks/<net_id>")
    def show_network(net_id: str) -> Any:
        net = next((n for n in networks() if n["id"] == net_id), None)
        if net is None:
            raise not_found("networks", net_id)
        return {"network": _stamp(_public(net))}

    @bp.get("/subnets")
    def list_subnets() -> Any:
        return listing("subnets", subnets())

    @bp.get("/subnets/<subnet_id>")
    def show_subnet(subnet_id: str) -> Any:
        sub = next((s for s in subnets() if s["id"] == subnet_id), None)
        if sub is None:
            raise not_found("subnets", subnet_id)
        return {"subnet": _stamp(sub)}

    # ---------------------------------------------------------------- ports

    @bp.get("/ports")
    def list_ports() -> Any:
        return listing("ports", list(store.read()["ports"].values()))

    @bp.get("/ports/<port_id>")
    def show_port(port_id: str) -> Any:
        port = store.read()["ports"].get(port_id)
        if port is None or not visible(port):
            raise not_found("ports", port_id)
        return {"port": _stamp(port)}

    # ---------------------------------------------------------------- security groups

    def groups_with_rules(st: State) -> list[dict[str, Any]]:
        out = []
        for sg in st["security_groups"].values():
            rules = [
                _stamp(r)
                for r in st["security_group_rules"].values()
                if r["security_group_id"] == sg["id"]
            ]
            out.append({**sg, "security_group_rules": rules})
        return out

    @bp.get("/security-groups")
    def list_security_groups() -> Any:
        with store.tx() as st:
            ensure_default_security_group(st, g.ctx.project_id)
            groups = groups_with_rules(st)
        return listing("security_groups", groups)

    @bp.get("/security-groups/<sg_id>")
    def show_security_group(sg_id: str) -> Any:
        st = store.read()
        sg = next((s for s in groups_with_rules(st) if s["id"] == sg_id), None)
        if sg is None or not visible(sg):
            raise not_found("security_groups", sg_id)
        return {"security_group": _stamp(sg)}

    @bp.post("/security-groups")
    def create_security_group() -> Any:
        body = json_body("security_group")
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > 255:
            raise ApiError(400, "Invalid input for name.", neutron_type="HTTPBadRequest")
        if name == "default":
            raise ApiError(
                409,
                "Default security group already exists.",
                neutron_type="SecurityGroupDefaultAlreadyExists",
            )
        with store.tx() as st:
            ensure_default_security_group(st, g.ctx.project_id)
            sg = _new_group(st, g.ctx.project_id, name, str(body.get("description") or ""))
            out = next(s for s in groups_with_rules(st) if s["id"] == sg["id"])
        return {"security_group": _stamp(out)}, 201

    @bp.delete("/security-groups/<sg_id>")
    def delete_security_group(sg_id: str) -> Any:
        with store.tx() as st:
            sg = st["security_groups"].get(sg_id)
            if sg is None or not visible(sg):
                raise not_found("security_groups", sg_id)
            if any(sg_id in p["security_groups"] for p in st["ports"].values()):
                raise ApiError(
                    409, f"Security Group {sg_id} in use.", neutron_type="SecurityGroupInUse"
                )
            del st["security_groups"][sg_id]
            for rid in [
                r for r, v in st["security_group_rules"].items() if v["security_group_id"] == sg_id
            ]:
                del st["security_group_rules"][rid]
        return "", 204

    @bp.get("/security-group-rules")
    def list_rules() -> Any:
        return listing("security_group_rules", list(store.read()["security_group_rules"].values()))

    @bp.get("/security-group-rules/<rule_id>")
    def show_rule(rule_id: str) -> Any:
        rule = store.read()["security_group_rules"].get(rule_id)
        if rule is None or not visible(rule):
            raise not_found("security_group_rules", rule_id)
        return {"security_group_rule": _stamp(rule)}

    @bp.post("/security-group-rules")
    def create_rule() -> Any:
        body = json_body("security_group_rule")
        direction = body.get("direction")
        if direction not in ("ingress", "egress"):
            raise ApiError(
                400,
                f"Invalid input for direction. Reason: '{direction}' is not in "
                "['ingress', 'egress'].",
                neutron_type="HTTPBadRequest",
            )
        ethertype = body.get("ethertype", "IPv4")
        prefix = body.get("remote_ip_prefix")
        if prefix is not None:
            try:
                prefix = str(ipaddress.ip_network(prefix, strict=False))
            except ValueError as e:
                raise ApiError(
                    400,
                    f"Invalid input for remote_ip_prefix: {prefix}",
                    neutron_type="HTTPBadRequest",
                ) from e
        fields = ("protocol", "port_range_min", "port_range_max", "remote_group_id")
        wanted = {k: body.get(k) for k in fields}
        if isinstance(wanted["protocol"], str):
            wanted["protocol"] = wanted["protocol"].lower()
        with store.tx() as st:
            sg_id = body.get("security_group_id")
            sg = st["security_groups"].get(str(sg_id))
            if sg is None or not visible(sg):
                raise not_found("security_groups", str(sg_id))
            for r in st["security_group_rules"].values():
                same = (
                    r["security_group_id"] == sg_id
                    and r["direction"] == direction
                    and r["ethertype"] == ethertype
                    and r["remote_ip_prefix"] == prefix
                    and all(r[k] == wanted[k] for k in fields)
                )
                if same:
                    raise ApiError(
                        409,
                        f"Security group rule already exists. Rule id is {r['id']}.",
                        neutron_type="SecurityGroupRuleExists",
                    )
            rule = _rule(
                sg_id,
                sg["project_id"],
                direction,
                ethertype,
                remote_ip_prefix=prefix,
                description=body.get("description"),
                **wanted,
            )
            st["security_group_rules"][rule["id"]] = rule
        return {"security_group_rule": _stamp(rule)}, 201

    @bp.delete("/security-group-rules/<rule_id>")
    def delete_rule(rule_id: str) -> Any:
        with store.tx() as st:
            rule = st["security_group_rules"].get(rule_id)
            if rule is None or not visible(rule):
                raise not_found("security_group_rules", rule_id)
            del st["security_group_rules"][rule_id]
        return "", 204

    # ---------------------------------------------------------------- floating IPs

    def fip_view(st: State, fip: dict[str, Any]) -> dict[str, Any]:
        out = _stamp(fip)
        port = st["ports"].get(fip["port_id"] or "")
        out["port_details"] = (
            {
                "name": port["name"],
                "network_id": port["network_id"],
                "mac_address": port["mac_address"],
                "admin_state_up": True,
                "status": port["status"],
                "device_id": port["device_id"],
                "device_owner": port["device_owner"],
            }
            if port
            else None
        )
        return out

    def associate(st: State, fip: dict[str, Any], port_id: str | None) -> None:
        if port_id is None:
            fip.update(port_id=None, fixed_ip_address=None, router_id=None, status="DOWN")
            return
        port = st["ports"].get(port_id)
        if port is None or not visible(port):
            raise not_found("ports", port_id)
        for other in st["floatingips"].values():
            if other["port_id"] == port_id and other["id"] != fip["id"]:
                raise ApiError(
                    409,
                    f"Cannot associate floating IP {fip['floating_ip_address']} "
                    f"({fip['id']}) with port {port_id} using fixed IP "
                    f"{port['fixed_ips'][0]['ip_address']}, as that fixed IP already has a "
                    f"floating IP on external network {other['floating_network_id']}.",
                    neutron_type="FloatingIPPortAlreadyAssociated",
                )
        fip.update(
            port_id=port_id,
            fixed_ip_address=port["fixed_ips"][0]["ip_address"],
            router_id=ROUTER_ID,
            status="ACTIVE",
        )

    def next_public_address(st: State) -> str:
        taken = {f["floating_ip_address"] for f in st["floatingips"].values()}
        for host in ipaddress.ip_network(PUBLIC_CIDR).hosts():
            if str(host) not in taken:
                return str(host)
        raise ApiError(
            409,
            f"No more IP addresses available on network {stable_id('network', PUBLIC_NET)}.",
            neutron_type="IpAddressGenerationFailure",
        )

    @bp.get("/floatingips")
    def list_floating_ips() -> Any:
        st = store.read()
        items = [fip_view(st, f) for f in st["floatingips"].values()]
        return listing("floatingips", items)

    @bp.get("/floatingips/<fip_id>")
    def show_floating_ip(fip_id: str) -> Any:
        st = store.read()
        fip = st["floatingips"].get(fip_id)
        if fip is None or not visible(fip):
            raise not_found("floatingips", fip_id)
        return {"floatingip": fip_view(st, fip)}

    @bp.post("/floatingips")
    def create_floating_ip() -> Any:
        body = json_body("floatingip")
        net_id = body.get("floating_network_id")
        if net_id != stable_id("network", PUBLIC_NET):
            if net_id == stable_id("network", PRIVATE_NET):
                raise ApiError(
                    400,
                    f"Bad floatingip request: Network {net_id} is not a valid external network.",
                    neutron_type="BadRequest",
                )
            raise not_found("networks", str(net_id))
        now = time.time()
        with store.tx() as st:
            fip: dict[str, Any] = {
                "id": str(uuid.uuid4()),
                "floating_network_id": net_id,
                "floating_ip_address": None,
                "fixed_ip_address": None,
                "port_id": None,
                "router_id": None,
                "status": "DOWN",
                "project_id": g.ctx.project_id,
                "description": str(body.get("description") or ""),
                "dns_domain": "",
                "dns_name": "",
                "qos_policy_id": None,
                "tags": [],
                "created_at": now,
                "updated_at": now,
            }
            associate(st, fip, body.get("port_id"))
            # no NAT on loopback: a floating IP made for a port is that port's own address
            fip["floating_ip_address"] = fip["fixed_ip_address"] or next_public_address(st)
            st["floatingips"][fip["id"]] = fip
            return {"floatingip": fip_view(st, fip)}, 201

    @bp.put("/floatingips/<fip_id>")
    def update_floating_ip(fip_id: str) -> Any:
        body = json_body("floatingip")
        with store.tx() as st:
            fip = st["floatingips"].get(fip_id)
            if fip is None or not visible(fip):
                raise not_found("floatingips", fip_id)
            if "port_id" in body:
                associate(st, fip, body["port_id"])
            if "description" in body:
                fip["description"] = str(body["description"] or "")
            fip["updated_at"] = time.time()
            fip["revision_number"] = fip.get("revision_number", 1) + 1
            return {"floatingip": fip_view(st, fip)}

    @bp.delete("/floatingips/<fip_id>")
    def delete_floating_ip(fip_id: str) -> Any:
        with store.tx() as st:
            fip = st["floatingips"].get(fip_id)
            if fip is None or not visible(fip):
                raise not_found("floatingips", fip_id)
            del st["floatingips"][fip_id]
        return "", 204

    return bp


def _public(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if not k.startswith("_")}


def version_document(base: str) -> dict[str, Any]:
    return {
        "versions": [
            {
                "id": "v2.0",
                "status": "CURRENT",
                "links": [{"href": f"{base}/v2.0/", "rel": "self"}],
            }
        ]
    }


def resources_document(base: str) -> dict[str, Any]:
    return {
        "resources": [
            {
                "name": r.rstrip("s").replace("-", "_") if r != "floatingips" else "floatingip",
                "collection": r.replace("-", "_"),
                "links": [{"href": f"{base}/v2.0/{r}", "rel": "self"}],
            }
            for r in RESOURCES
        ]
    }
