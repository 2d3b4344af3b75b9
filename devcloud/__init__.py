"""`stackml devcloud`: a real Keystone, a real Swift and the Nova emulator on loopback."""

from __future__ import annotations


class DevCloudError(Exception):
    """Starting, stopping or configuring the devcloud failed; the message says what to do."""
