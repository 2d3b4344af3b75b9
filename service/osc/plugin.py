"""The osc-lib plugin module (`openstack.cli.extension` = `ml`): the client factory and the
global options `openstack` adds to its parser.

The client is stackml's own REST client (service/client.py) with the `openstack` command's
keystoneauth session as its token source; the API's URL comes from, in order: `--os-ml-endpoint`
(or $OS_ML_ENDPOINT), `machine_learning_endpoint_override` of clouds.yaml, the Keystone
catalog's `machine-learning` endpoint for the region and interface of the command."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from osc_lib import exceptions, utils

LOG = logging.getLogger(__name__)

API_NAME = "ml"
API_VERSION_OPTION = "os_ml_api_version"
API_VERSIONS = {"1": "service.client.StackMLClient"}
DEFAULT_API_VERSION = "1"
SERVICE_TYPE = "machine-learning"
# a prediction or an upload may take longer than a listing; every request still has this bound
TIMEOUT = 60.0


def endpoint_of(instance: Any) -> str:
    """The stackml API's URL for this `openstack` invocation (see the module docstring)."""
    options = getattr(instance, "_cli_options", None)
    config = getattr(options, "config", None) or {}
    explicit = config.get("ml_endpoint")
    if explicit:
        return str(explicit)
    from keystoneauth1 import exceptions as ksa_exceptions

    try:
        url = instance.get_endpoint_for_service_type(
            SERVICE_TYPE, region_name=instance.region_name, interface=instance.interface
        )
    except ksa_exceptions.ClientException as e:  # EndpointNotFound, no Keystone: one sentence
        raise exceptions.CommandError(
            f"no {SERVICE_TYPE} endpoint in the Keystone catalog ({type(e).__name__}: {e}); "
            "register the stackml API with `openstack endpoint create`, or pass --os-ml-endpoint"
        ) from e
    if not url:
        raise exceptions.CommandError(
            f"the Keystone catalog has no {SERVICE_TYPE} endpoint in region "
            f"{instance.region_name or '(any)'} for interface {instance.interface or 'public'}; "
            "register the stackml API with `openstack endpoint create`, or pass --os-ml-endpoint"
        )
    return str(url)


def make_client(instance: Any) -> Any:
    """The StackMLClient of this invocation: the catalog's endpoint, the session's token."""
    from service.client import KeystoneTokens, StackMLClient

    url = endpoint_of(instance)
    LOG.debug("stackml API at %s", url)
    tokens = KeystoneTokens(instance.session, "the openstack command's credentials")
    return StackMLClient(url, timeout=TIMEOUT, auth=tokens)


def build_option_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plugin's global options."""
    parser.add_argument(
        "--os-ml-api-version",
        metavar="<ml-api-version>",
        default=utils.env("OS_ML_API_VERSION", default=DEFAULT_API_VERSION),
        help=f"Machine learning (stackml) API version, default={DEFAULT_API_VERSION} "
        "(Env: OS_ML_API_VERSION)",
    )
    parser.add_argument(
        "--os-ml-endpoint",
        dest="ml_endpoint",
        metavar="<url>",
        default=os.environ.get("OS_ML_ENDPOINT") or None,
        help="The stackml API's URL, instead of the catalog's machine-learning endpoint "
        "(Env: OS_ML_ENDPOINT)",
    )
    return parser
