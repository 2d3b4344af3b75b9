"""Enable the plugin from a settings module, without copying the enabled files into Horizon.

    from openstack_dashboard.settings import *
    from stackml_dashboard.plugin_settings import enable
    enable(HORIZON_CONFIG, INSTALLED_APPS)

`update_dashboards` replaces the dashboard list and the panel customisations it computes, so
what Horizon's own enabled files set up is kept and the plugin's is added after it."""

from __future__ import annotations

from typing import Any


def enable(horizon_config: dict[str, Any], installed_apps: list[str]) -> None:
    from openstack_dashboard.utils import settings as settings_utils

    import stackml_dashboard.enabled

    # taken out while the plugin's files are applied (update_dashboards would warn about a
    # dashboard list in the settings), put back in front of the plugin's below
    kept = {
        key: horizon_config.pop(key, None)
        for key in ("dashboards", "default_dashboard", "panel_customization", "header_sections")
    }
    settings_utils.update_dashboards([stackml_dashboard.enabled], horizon_config, installed_apps)
    if kept["default_dashboard"] is not None:
        horizon_config.setdefault("default_dashboard", kept["default_dashboard"])
    before = tuple(kept["dashboards"] or ())
    horizon_config["dashboards"] = before + tuple(
        d for d in horizon_config["dashboards"] if d not in before
    )
    for key in ("panel_customization", "header_sections"):
        horizon_config[key] = list(kept[key] or []) + list(horizon_config[key])
