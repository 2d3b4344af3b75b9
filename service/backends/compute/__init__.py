"""Compute backends: sandbox (local OpenSSH servers) and openstack (Nova)."""
