"""Nova's compute API v2.1 (microversions 2.1-2.100), the subset openstacksdk 4.22 calls.

Flavors (extra specs inline from 2.61), keypairs (per user), servers (create, show, list with
filters, delete, console output, metadata, tags), limits and availability zones; status codes
and error bodies as Nova's (nova/api/openstack/wsgi.py).
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, g, jsonify, request

from devcloud.emulator import faults
from devcloud.emulator.catalog import PRIVATE_NET, PUBLIC_NET, stable_id
from devcloud.emulator.neutron import ensure_default_security_group
from devcloud.emulator.nova_views import (
    compute_base,
    fingerprint,
    flavor_view,
    keypair_view,
    links,
    server_view,
)
from devcloud.emulator.state import State
from devcloud.emulator.wire import (
    ApiError,
    Microversion,
    json_body,
    mv_str,
    parse_isotime,
    requested_microversion,
)

if TYPE_CHECKING:
    from devcloud.emulator.app import Emulator

KEYPAIR_NAME_OLD = re.compile(r"^[a-zA-Z0-9 _-]+$")  # before 2.92
KEYPAIR_NAME_NEW = re.compile(r"^[a-zA-Z0-9 @._-]+$")  # 2.92+
TAG_RE = re.compile(r"^[^,/]{1,60}$")
MAX_METADATA = 128


def _check_meta(meta: Any) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 255 and len(v) <= 255
        for k, v in meta.items()
    ):
        raise ApiError(400, "Invalid input for field/attribute metadata.")
    if len(meta) > MAX_METADATA:
        raise ApiError(
            403,
            f"Quota exceeded for metadata_items: Requested {len(meta)}, but "
            f"already used 0 of {MAX_METADATA} metadata_items",
        )
    return dict(meta)


def _check_tags(tags: Any) -> list[str]:
    if not isinstance(tags, list) or len(tags) > 50:
        raise ApiError(400, "Invalid input for field/attribute tags.")
    for t in tags:
        if not isinstance(t, str) or not TAG_RE.match(t):
            raise ApiError(400, f"Invalid input for field/attribute tags. Value: {t!r}.")
    return list(dict.fromkeys(tags))


def _hostname(name: str) -> str:
    host = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return host or "server"


def _truthy(value: str | None) -> bool:
    if value is None or value == "":
        return True
    if value.lower() in ("1", "t", "true", "on", "y", "yes"):
        return True
    if value.lower() in ("0", "f", "false", "off", "n", "no"):
        return False
    raise ApiError(400, f"Invalid value '{value}' for all_tenants: expected a boolean")


def _paginate(items: list[dict[str, Any]], key: str = "id") -> tuple[list[dict[str, Any]], bool]:
    """limit/marker as Nova does them; returns (page, more)."""
    marker = request.args.get("marker")
    if marker is not None:
        idx = next((i for i, it in enumerate(items) if it[key] == marker), None)
        if idx is None:
            raise ApiError(400, f"marker [{marker}] not found")
        items = items[idx + 1 :]
    limit = request.args.get("limit")
    if limit is not None:
        try:
            n = int(limit)
        except ValueError as e:
            raise ApiError(400, "limit param must be an integer") from e
        if n < 0:
            raise ApiError(400, "limit param must be positive")
        return items[:n], len(items) > n
    return items, False


def blueprint(emu: Emulator) -> Blueprint:
    bp = Blueprint("nova", __name__, url_prefix="/compute/v2.1")
    cfg, store, machines = emu.cfg, emu.store, emu.machines

    @bp.before_request
    def _microversion() -> None:
        g.mv = (2, 1)
        g.mv = requested_microversion()

    @bp.after_request
    def _headers(resp: Response) -> Response:
        mv = mv_str(getattr(g, "mv", (2, 1)))
        resp.headers["OpenStack-API-Version"] = f"compute {mv}"
        resp.headers["X-OpenStack-Nova-API-Version"] = mv
        resp.headers["Vary"] = "OpenStack-API-Version, X-OpenStack-Nova-API-Version"
        return resp

    def mv() -> Microversion:
        mv_: Microversion = g.mv
        return mv_

    def visible(srv: dict[str, Any]) -> bool:
        return bool(g.ctx.is_admin or srv["project_id"] == g.ctx.project_id)

    def get_server(st: State, server_id: str) -> dict[str, Any]:
        srv = st["servers"].get(server_id)
        if srv is None or not visible(srv):
            raise ApiError(404, f"Instance {server_id} could not be found.")
        return dict(srv)

    # ------------------------------------------------------------------ flavors

    def find_flavor(flavor_id: str) -> Any:
        f = next((f for f in cfg.flavors if f.id == flavor_id), None)
        if f is None:
            raise ApiError(404, f"Flavor {flavor_id} could not be found.")
        return f

    @bp.get("/flavors")
    @bp.get("/flavors/detail")
    def list_flavors() -> Any:
        detail = request.path.rstrip("/").endswith("/detail")
        flavors = list(cfg.flavors)
        try:
            min_ram = int(request.args.get("minRam", 0))
            min_disk = int(request.args.get("minDisk", 0))
        except ValueError as e:
            raise ApiError(400, "Invalid minRam or minDisk filter") from e
        flavors = [f for f in flavors if f.ram >= min_ram and f.disk >= min_disk]
        flavors.sort(key=lambda f: f.id)
        views = [flavor_view(f, mv(), detail) for f in flavors]
        page, more = _paginate(views)
        body: dict[str, Any] = {"flavors": page}
        if more:
            body["flavors_links"] = [
                {"href": f"{compute_base()}/v2.1/flavors?marker={page[-1]['id']}", "rel": "next"}
            ]
        return body

    @bp.get("/flavors/<flavor_id>")
    def show_flavor(flavor_id: str) -> Any:
        return {"flavor": flavor_view(find_flavor(flavor_id), mv(), True)}

    @bp.get("/flavors/<flavor_id>/os-extra_specs")
    def flavor_extra_specs(flavor_id: str) -> Any:
        return {"extra_specs": dict(find_flavor(flavor_id).extra_specs)}

    @bp.get("/flavors/<flavor_id>/os-extra_specs/<key>")
    def flavor_extra_spec(flavor_id: str, key: str) -> Any:
        specs = find_flavor(flavor_id).extra_specs
        if key not in specs:
            raise ApiError(404, f"Flavor {flavor_id} has no extra specs with key {key}.")
        return {key: specs[key]}

    # ------------------------------------------------------------------ keypairs

    def keypair_owner(body_user: Any = None) -> str:
        user = body_user if body_user is not None else request.args.get("user_id")
        if user is None or mv() < (2, 10):
            return str(g.ctx.user_id)
        if user != g.ctx.user_id and not g.ctx.is_admin:
            raise ApiError(403, "Policy doesn't allow os_compute_api:os-keypairs to be performed.")
        return str(user)

    @bp.post("/os-keypairs")
    def create_keypair() -> Any:
        body = json_body("keypair")
        name = body.get("name")
        name_re = KEYPAIR_NAME_NEW if mv() >= (2, 92) else KEYPAIR_NAME_OLD
        if not isinstance(name, str) or not 0 < len(name) <= 255 or not name_re.match(name):
            raise ApiError(400, "Keypair data is invalid: Keypair name contains unsafe characters")
        kind = body.get("type", "ssh") if mv() >= (2, 2) else "ssh"
        if kind not in ("ssh", "x509"):
            raise ApiError(400, f"Invalid input for field/attribute type. Value: {kind}.")
        user = keypair_owner(body.get("user_id"))
        public_key, private_key = body.get("public_key"), None
        if public_key is None:
            if mv() >= (2, 92):
                raise ApiError(
                    400,
                    "Invalid input for field/attribute keypair. "
                    "'public_key' is a required property",
                )
            private_key, public_key = _generate_keypair(name)
        if not isinstance(public_key, str):
            raise ApiError(400, "Keypair data is invalid: failed to generate fingerprint")
        public_key = public_key.strip()
        try:
            fp = fingerprint(public_key)
        except (IndexError, ValueError) as e:
            raise ApiError(400, "Keypair data is invalid: failed to generate fingerprint") from e
        with store.tx() as st:
            key = f"{user}/{name}"
            if key in st["keypairs"]:
                raise ApiError(409, f"Key pair '{name}' already exists.")
            kp = {
                "id": len(st["keypairs"]) + 1 + int(time.time() * 1000) % 1_000_000,
                "name": name,
                "user_id": user,
                "type": kind,
                "public_key": public_key,
                "fingerprint": fp,
                "created_at": time.time(),
            }
            st["keypairs"][key] = kp
        view = keypair_view(kp, mv(), full=False)
        view["user_id"] = user
        if private_key is not None:
            view["private_key"] = private_key
        return {"keypair": view}, (201 if mv() >= (2, 2) else 200)

    @bp.get("/os-keypairs")
    def list_keypairs() -> Any:
        user = keypair_owner()
        st = store.read()
        kps = sorted(
            (kp for kp in st["keypairs"].values() if kp["user_id"] == user),
            key=lambda kp: kp["name"],
        )
        page, more = _paginate(kps, "name") if mv() >= (2, 35) else (kps, False)
        body: dict[str, Any] = {
            "keypairs": [{"keypair": keypair_view(kp, mv(), full=False)} for kp in page]
        }
        if more:
            body["keypairs_links"] = [
                {
                    "href": f"{compute_base()}/v2.1/os-keypairs?marker={page[-1]['name']}",
                    "rel": "next",
                }
            ]
        return body

    def find_keypair(st: State, name: str) -> dict[str, Any]:
        user = keypair_owner()
        kp = st["keypairs"].get(f"{user}/{name}")
        if kp is None:
            raise ApiError(404, f"Keypair {name} not found for user {user}")
        return dict(kp)

    @bp.get("/os-keypairs/<name>")
    def show_keypair(name: str) -> Any:
        return {"keypair": keypair_view(find_keypair(store.read(), name), mv(), full=True)}

    @bp.delete("/os-keypairs/<name>")
    def delete_keypair(name: str) -> Any:
        with store.tx() as st:
            kp = find_keypair(st, name)
            del st["keypairs"][f"{kp['user_id']}/{name}"]
        return "", (204 if mv() >= (2, 2) else 202)

    # ------------------------------------------------------------------ servers

    def networks_of(body: dict[str, Any]) -> list[str]:
        private, public = stable_id("network", PRIVATE_NET), stable_id("network", PUBLIC_NET)
        if "networks" not in body:
            if mv() >= (2, 37):
                raise ApiError(
                    400,
                    f"Invalid input for field/attribute server. Value: {body}. "
                    "'networks' is a required property",
                )
            return [private]
        nets = body["networks"]
        if nets == "auto":
            return [private]
        if nets == "none":
            return []
        if not isinstance(nets, list):
            raise ApiError(400, "Invalid input for field/attribute networks.")
        chosen = []
        for n in nets:
            if not isinstance(n, dict):
                raise ApiError(400, "Invalid input for field/attribute networks.")
            if "port" in n:
                raise ApiError(
                    400, "Booting with a pre-made port is not emulated; give a network uuid"
                )
            uid = n.get("uuid")
            if uid == public:
                raise ApiError(
                    400, f"Network {uid} requires a subnet in order to boot instances on."
                )
            if uid != private:
                raise ApiError(400, f"Network {uid} could not be found.")
            chosen.append(uid)
        return chosen

    def security_groups_of(st: State, body: dict[str, Any]) -> tuple[list[str], list[str]]:
        ensure_default_security_group(st, g.ctx.project_id)
        wanted = body.get("security_groups") or [{"name": "default"}]
        if not isinstance(wanted, list):
            raise ApiError(400, "Invalid input for field/attribute security_groups.")
        names, ids = [], []
        for item in wanted:
            ref = item.get("name") if isinstance(item, dict) else None
            if not isinstance(ref, str):
                raise ApiError(400, "Invalid input for field/attribute security_groups.")
            found = [
                sg
                for sg in st["security_groups"].values()
                if sg["project_id"] == g.ctx.project_id and ref in (sg["id"], sg["name"])
            ]
            if not found:
                raise ApiError(
                    400, f"Security group {ref} not found for project {g.ctx.project_id}."
                )
            if len(found) > 1:
                raise ApiError(
                    409,
                    f"Multiple security_group matches found for name '{ref}', "
                    "use an ID to be more specific.",
                )
            names.append(found[0]["name"])
            ids.append(found[0]["id"])
        return names, ids

    def check_quota(st: State, project: str, flavor: Any) -> None:
        mine = [s for s in st["servers"].values() if s["project_id"] == project]
        used = {
            "instances": len(mine),
            "cores": sum(s["flavor"]["vcpus"] for s in mine),
            "ram": sum(s["flavor"]["ram"] for s in mine),
        }
        asked = {"instances": 1, "cores": flavor.vcpus, "ram": flavor.ram}
        over = [r for r in ("instances", "cores", "ram") if used[r] + asked[r] > cfg.quota[r]]
        if over:
            r = over[0]
            raise ApiError(
                403,
                f"Quota exceeded for {', '.join(over)}: Requested {asked[r]}, but already "
                f"used {used[r]} of {cfg.quota[r]} {r}",
            )

    @bp.post("/servers")
    def create_server() -> Any:
        body = json_body("server")
        ctx = g.ctx
        name = body.get("name")
        if not isinstance(name, str) or not 0 < len(name.strip()) <= 255:
            raise ApiError(400, "Invalid input for field/attribute name.")
        flavor = cfg.flavor(str(body.get("flavorRef", "")))
        if flavor is None:
            raise ApiError(400, f"Flavor {body.get('flavorRef')} could not be found.")
        image = cfg.image(str(body.get("imageRef", "")))
        if image is None:
            raise ApiError(400, f"Image {body.get('imageRef')} could not be found.")
        networks = networks_of(body)
        metadata = _check_meta(body.get("metadata", {}))
        if "tags" in body and mv() < (2, 52):
            raise ApiError(
                400,
                "Invalid input for field/attribute server. Additional "
                "properties are not allowed ('tags' was unexpected)",
            )
        tags = _check_tags(body.get("tags", []))
        az = body.get("availability_zone")
        if az is not None and az not in cfg.zones:
            raise ApiError(400, "The requested availability zone is not available")
        description = body.get("description") if mv() >= (2, 19) else None
        key_name = body.get("key_name")
        now = time.time()
        with store.tx() as st:
            public_key = None
            if key_name is not None:
                kp = st["keypairs"].get(f"{ctx.user_id}/{key_name}")
                if kp is None:
                    raise ApiError(400, "Invalid key_name provided.")
                public_key = kp["public_key"]
            sg_names, sg_ids = security_groups_of(st, body)
            sid = str(uuid.uuid4())
            srv: dict[str, Any] = {
                "id": sid,
                "seq": len(st["servers"]) + int(now) % 100000,
                "name": name,
                "hostname": _hostname(name),
                "project_id": ctx.project_id,
                "user_id": ctx.user_id,
                "flavor": {
                    "id": flavor.id,
                    "name": flavor.name,
                    "vcpus": flavor.vcpus,
                    "ram": flavor.ram,
                    "disk": flavor.disk,
                    "ephemeral": flavor.ephemeral,
                    "swap": flavor.swap,
                    "extra_specs": dict(flavor.extra_specs),
                },
                "image_id": image.id,
                "image_name": image.name,
                "key_name": key_name,
                "public_key": public_key,
                "metadata": metadata,
                "tags": tags,
                "description": description,
                "availability_zone": az or cfg.zones[0],
                "requested_az": az,
                "security_groups": sg_names,
                "security_group_ids": sg_ids,
                "networks": networks,
                "status": "BUILD",
                "vm_state": "building",
                "task_state": "scheduling",
                "power_state": 0,
                "created": now,
                "updated": now,
                "launched_at": None,
                "fault": None,
                "sandbox_id": None,
                "address": None,
                "port_id": None,
            }
            # a fault used up is committed even though the request fails: leave the block
            refused = faults.take(st, "quota_exceeded", srv) is not None
            if not refused:
                check_quota(st, ctx.project_id, flavor)
                slow = faults.take(st, "slow_build", srv)
                srv["boot"] = {
                    "no_valid_host": faults.take(st, "no_valid_host", srv) is not None,
                    "delay": slow["seconds"] if slow else 0.0,
                }
                st["servers"][sid] = srv
        if refused:
            limit = cfg.quota["cores"]
            raise ApiError(
                403,
                f"Quota exceeded for cores: Requested {flavor.vcpus}, but "
                f"already used {limit} of {limit} cores",
            )
        machines.launch(sid)
        view: dict[str, Any] = {
            "id": sid,
            "links": links("servers", sid),
            "OS-DCF:diskConfig": "MANUAL",
            "security_groups": [{"name": n} for n in sg_names],
        }
        if body.get("return_reservation_id"):
            return {"reservation_id": f"r-{secrets.token_hex(4)}"}, 202
        view["adminPass"] = secrets.token_urlsafe(9)
        resp = jsonify({"server": view})
        resp.status_code = 202
        resp.headers["Location"] = links("servers", sid)[0]["href"]
        return resp

    def vanish_check(server_id: str) -> None:
        """An injected vanish: the server is gone before this GET sees it."""
        sandbox = None
        with store.tx() as st:
            srv = st["servers"].get(server_id)
            if srv is None or srv["status"] != "ACTIVE" or not visible(srv):
                return
            if faults.take(st, "vanish", srv) is None:
                return
            del st["servers"][server_id]
            sandbox = srv.get("sandbox_id")
            from devcloud.emulator.machines import release_network

            release_network(st, server_id)
        machines.vanish(server_id, sandbox)

    @bp.get("/servers/<server_id>")
    def show_server(server_id: str) -> Any:
        vanish_check(server_id)
        machines.check(server_id)
        st = store.read()
        return {"server": server_view(st, get_server(st, server_id), mv(), g.ctx)}

    @bp.get("/servers")
    @bp.get("/servers/detail")
    def list_servers() -> Any:
        detail = request.path.rstrip("/").endswith("/detail")
        args = request.args
        all_tenants = "all_tenants" in args and _truthy(args.get("all_tenants"))
        if all_tenants and not g.ctx.is_admin:
            rule = "detail" if detail else "index"
            raise ApiError(
                403,
                f"Policy doesn't allow os_compute_api:servers:{rule}:get_all_tenants to be "
                "performed.",
            )
        st = store.read()
        for sid in list(st["servers"]):
            vanish_check(sid)
            machines.check(sid)
        st = store.read()
        servers = list(st["servers"].values())
        project = args.get("project_id") or args.get("tenant_id")
        if not all_tenants:
            servers = [s for s in servers if s["project_id"] == g.ctx.project_id]
        elif project:
            servers = [s for s in servers if s["project_id"] == project]
        servers = [s for s in servers if _server_matches(s, args)]
        servers.sort(key=lambda s: (s["created"], s["id"]), reverse=True)
        page, more = _paginate(servers)
        if detail:
            views = [server_view(st, s, mv(), g.ctx) for s in page]
        else:
            views = [
                {"id": s["id"], "name": s["name"], "links": links("servers", s["id"])} for s in page
            ]
        body: dict[str, Any] = {"servers": views}
        if more:
            path = "servers/detail" if detail else "servers"
            query = "&".join(f"{k}={v}" for k, v in args.items() if k != "marker")
            body["servers_links"] = [
                {
                    "href": f"{compute_base()}/v2.1/{path}?{query}&marker={page[-1]['id']}",
                    "rel": "next",
                }
            ]
        return body

    @bp.delete("/servers/<server_id>")
    def delete_server(server_id: str) -> Any:
        with store.tx() as st:
            srv = get_server(st, server_id)
            failed = faults.take(st, "delete_fails", srv) is not None
            if not failed:
                cur = st["servers"][server_id]
                cur["task_state"] = "deleting"
                cur["updated"] = time.time()
        if failed:
            raise ApiError(500, UNEXPECTED_DELETE)
        machines.delete(server_id)
        return "", 204

    @bp.put("/servers/<server_id>")
    def update_server(server_id: str) -> Any:
        body = json_body("server")
        with store.tx() as st:
            get_server(st, server_id)
            cur = st["servers"][server_id]
            if "name" in body:
                if not isinstance(body["name"], str) or not body["name"].strip():
                    raise ApiError(400, "Invalid input for field/attribute name.")
                cur["name"] = body["name"]
            if "description" in body and mv() >= (2, 19):
                cur["description"] = body["description"]
            cur["updated"] = time.time()
            return {"server": server_view(st, dict(cur), mv(), g.ctx)}

    @bp.post("/servers/<server_id>/action")
    def server_action(server_id: str) -> Any:
        body = json_body()
        if len(body) != 1:
            raise ApiError(400, "Malformed request body")
        action, arg = next(iter(body.items()))
        if action != "os-getConsoleOutput":
            raise ApiError(400, f"There is no such action: {action}")
        length = (arg or {}).get("length") if isinstance(arg, dict | type(None)) else None
        if length is not None:
            try:
                length = int(length)
            except (TypeError, ValueError) as e:
                raise ApiError(400, "Invalid input for field/attribute length.") from e
            if length < -1:
                raise ApiError(400, "Invalid input for field/attribute length.")
            if length == -1:
                length = None
        srv = get_server(store.read(), server_id)
        if not srv.get("sandbox_id"):
            raise ApiError(409, f"Instance {server_id} is not ready")
        return {"output": machines.console(srv, length)}

    # ------------------------------------------------------------------ metadata, tags

    @bp.get("/servers/<server_id>/metadata")
    def show_metadata(server_id: str) -> Any:
        return {"metadata": get_server(store.read(), server_id)["metadata"]}

    @bp.route("/servers/<server_id>/metadata", methods=["POST", "PUT"])
    def set_metadata(server_id: str) -> Any:
        new = _check_meta(json_body().get("metadata"))
        with store.tx() as st:
            get_server(st, server_id)
            cur = st["servers"][server_id]
            cur["metadata"] = {**cur["metadata"], **new} if request.method == "POST" else new
            _check_meta(cur["metadata"])
            return {"metadata": dict(cur["metadata"])}

    @bp.get("/servers/<server_id>/metadata/<key>")
    def show_metadata_item(server_id: str, key: str) -> Any:
        meta = get_server(store.read(), server_id)["metadata"]
        if key not in meta:
            raise ApiError(404, "Metadata item was not found")
        return {"meta": {key: meta[key]}}

    @bp.put("/servers/<server_id>/metadata/<key>")
    def set_metadata_item(server_id: str, key: str) -> Any:
        item = json_body().get("meta")
        if not isinstance(item, dict) or list(item) != [key]:
            raise ApiError(400, "Request body and URI mismatch")
        with store.tx() as st:
            get_server(st, server_id)
            cur = st["servers"][server_id]
            cur["metadata"] = _check_meta({**cur["metadata"], **item})
        return {"meta": item}

    @bp.delete("/servers/<server_id>/metadata/<key>")
    def delete_metadata_item(server_id: str, key: str) -> Any:
        with store.tx() as st:
            get_server(st, server_id)
            meta = st["servers"][server_id]["metadata"]
            if key not in meta:
                raise ApiError(404, "Metadata item was not found")
            del meta[key]
        return "", 204

    def require_tags_mv() -> None:
        if mv() < (2, 26):
            raise ApiError(404, "The resource could not be found.")

    @bp.get("/servers/<server_id>/tags")
    def list_tags(server_id: str) -> Any:
        require_tags_mv()
        return {"tags": get_server(store.read(), server_id)["tags"]}

    @bp.put("/servers/<server_id>/tags")
    def replace_tags(server_id: str) -> Any:
        require_tags_mv()
        tags = _check_tags(json_body().get("tags"))
        with store.tx() as st:
            get_server(st, server_id)
            st["servers"][server_id]["tags"] = tags
        return {"tags": tags}

    @bp.delete("/servers/<server_id>/tags")
    def clear_tags(server_id: str) -> Any:
        require_tags_mv()
        with store.tx() as st:
            get_server(st, server_id)
            st["servers"][server_id]["tags"] = []
        return "", 204

    @bp.get("/servers/<server_id>/tags/<tag>")
    def check_tag(server_id: str, tag: str) -> Any:
        require_tags_mv()
        if tag not in get_server(store.read(), server_id)["tags"]:
            raise ApiError(404, f"Tag {tag} could not be found.")
        return "", 204

    @bp.put("/servers/<server_id>/tags/<tag>")
    def add_tag(server_id: str, tag: str) -> Any:
        require_tags_mv()
        _check_tags([tag])
        with store.tx() as st:
            get_server(st, server_id)
            tags = st["servers"][server_id]["tags"]
            if tag in tags:
                return "", 204
            if len(tags) >= 50:
                raise ApiError(400, "The number of tags exceeded the per-server limit 50")
            tags.append(tag)
        resp = Response("", status=201)
        resp.headers["Location"] = f"{links('servers', server_id)[0]['href']}/tags/{tag}"
        return resp

    @bp.delete("/servers/<server_id>/tags/<tag>")
    def delete_tag(server_id: str, tag: str) -> Any:
        require_tags_mv()
        with store.tx() as st:
            get_server(st, server_id)
            tags = st["servers"][server_id]["tags"]
            if tag not in tags:
                raise ApiError(404, f"Tag {tag} could not be found.")
            tags.remove(tag)
        return "", 204

    # ------------------------------------------------------------------ limits, zones

    @bp.get("/limits")
    def limits() -> Any:
        project = g.ctx.project_id
        if request.args.get("tenant_id") and g.ctx.is_admin:
            project = request.args["tenant_id"]
        st = store.read()
        mine = [s for s in st["servers"].values() if s["project_id"] == project]
        absolute: dict[str, Any] = {
            "maxServerMeta": MAX_METADATA,
            "maxTotalCores": cfg.quota["cores"],
            "maxTotalInstances": cfg.quota["instances"],
            "maxTotalKeypairs": 100,
            "maxTotalRAMSize": cfg.quota["ram"],
            "maxServerGroups": 10,
            "maxServerGroupMembers": 10,
            "totalCoresUsed": sum(s["flavor"]["vcpus"] for s in mine),
            "totalInstancesUsed": len(mine),
            "totalRAMUsed": sum(s["flavor"]["ram"] for s in mine),
            "totalServerGroupsUsed": 0,
        }
        if mv() < (2, 57):
            absolute.update(maxImageMeta=128, maxPersonality=5, maxPersonalitySize=10240)
        if mv() < (2, 36):
            absolute.update(
                maxSecurityGroupRules=20,
                maxSecurityGroups=10,
                maxTotalFloatingIps=10,
                totalFloatingIpsUsed=0,
                totalSecurityGroupsUsed=0,
            )
        return {"limits": {"absolute": absolute, "rate": []}}

    @bp.get("/os-availability-zone")
    def availability_zones() -> Any:
        return {
            "availabilityZoneInfo": [
                {"zoneName": z, "zoneState": {"available": True}, "hosts": None} for z in cfg.zones
            ]
        }

    return bp


UNEXPECTED_DELETE = (
    "Unexpected API Error. Please report this at http://bugs.launchpad.net/nova/ and attach "
    "the Nova API log if possible.\n<class 'nova.exception.InstanceTerminationFailure'>"
)


def _server_matches(s: dict[str, Any], args: Any) -> bool:
    if "name" in args:
        try:
            if not re.search(args["name"], s["name"]):
                return False
        except re.error as e:
            raise ApiError(400, f"Invalid regular expression for name: {e}") from e
    if "status" in args and s["status"] != args["status"].upper():
        return False
    if "flavor" in args and s["flavor"]["id"] != args["flavor"]:
        return False
    if "image" in args and s["image_id"] != args["image"]:
        return False
    if "availability_zone" in args and s["availability_zone"] != args["availability_zone"]:
        return False
    if "ip" in args and not re.search(args["ip"], s.get("address") or ""):
        return False
    if "changes-since" in args and s["updated"] < parse_isotime(args["changes-since"]):
        return False
    if "changes-before" in args and s["updated"] > parse_isotime(args["changes-before"]):
        return False
    tags = set(s["tags"])

    def wanted(key: str) -> set[str]:
        return {t for t in args.get(key, "").split(",") if t}

    if "tags" in args and not wanted("tags") <= tags:
        return False
    if "tags-any" in args and not wanted("tags-any") & tags:
        return False
    if "not-tags" in args and wanted("not-tags") <= tags:
        return False
    return not ("not-tags-any" in args and wanted("not-tags-any") & tags)


def _generate_keypair(name: str) -> tuple[str, str]:
    """(private PEM, public line) for a keypair created without a public key (before 2.92)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return private, f"{public} Generated-by-Nova"
