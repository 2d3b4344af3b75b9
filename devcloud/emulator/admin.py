"""The emulator's own admin API (role admin): inject faults, read the API call counts.

POST   /compute/_stackml/faults        {"kind", "match", "count", "seconds"} -> 201 {"fault"}
GET    /compute/_stackml/faults        -> {"faults": [...]}
DELETE /compute/_stackml/faults[/id]   -> 204 (all, or one)
GET    /compute/_stackml/calls         -> {"calls": {"GET /compute/v2.1/servers/<id>": n}}
DELETE /compute/_stackml/calls         -> 204 (start counting afresh)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Blueprint, g, request

from devcloud.emulator import faults
from devcloud.emulator.wire import ApiError

if TYPE_CHECKING:
    from devcloud.emulator.app import Emulator


def blueprint(emu: Emulator) -> Blueprint:
    bp = Blueprint("stackml_admin", __name__, url_prefix="/compute/_stackml")

    @bp.before_request
    def _admin_only() -> None:
        if not g.ctx.is_admin:
            raise ApiError(403, "Policy doesn't allow stackml:emulator:admin to be performed.")

    @bp.post("/faults")
    def add_fault() -> Any:
        fault = faults.parse(request.get_json(silent=True))
        with emu.store.tx() as st:
            st["faults"][fault["id"]] = fault
        return {"fault": fault}, 201

    @bp.get("/faults")
    def list_faults() -> Any:
        items = sorted(emu.store.read()["faults"].values(), key=lambda f: f["created"])
        return {"faults": items}

    @bp.delete("/faults")
    def clear_faults() -> Any:
        with emu.store.tx() as st:
            st["faults"].clear()
        return "", 204

    @bp.delete("/faults/<fault_id>")
    def delete_fault(fault_id: str) -> Any:
        with emu.store.tx() as st:
            if st["faults"].pop(fault_id, None) is None:
                raise ApiError(404, f"Fault {fault_id} could not be found.")
        return "", 204

    @bp.get("/calls")
    def calls() -> Any:
        return {"calls": emu.call_counts()}

    @bp.delete("/calls")
    def reset_calls() -> Any:
        emu.reset_calls()
        return "", 204

    return bp
