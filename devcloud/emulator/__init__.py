"""A Nova/Neutron/Glance emulator that backs every server with a sandbox (docs/architecture.md).

It speaks Nova's wire API at microversion 2.100 for the subset openstacksdk uses, with Nova's
status codes and error bodies, plus the Neutron and Glance calls a stackml server needs, and
injects faults on an admin's request (devcloud/emulator/faults.py). Run it with
`python -m devcloud.emulator --help`; `cleanup(state_dir)` deletes every sandbox it left.
"""

from __future__ import annotations

from devcloud.emulator.catalog import EmulatorConfig
from devcloud.emulator.machines import cleanup

__all__ = ["EmulatorConfig", "cleanup"]
