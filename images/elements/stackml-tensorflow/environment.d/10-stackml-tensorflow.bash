# shellcheck shell=bash
# The runtime key (config/runtimes.yaml); its requirements are <key>-gpu.txt in this element.
export DIB_STACKML_RUNTIME=${DIB_STACKML_RUNTIME:-tensorflow-2.21}
# Fixed: where provisioning looks (workers/steps/provision.py OPENSTACK_RUNTIMES).
export DIB_STACKML_RUNTIMES_DIR=/opt/stackml/runtimes
# A PyPI mirror to install the runtime from (empty: PyPI).
export DIB_STACKML_PIP_INDEX_URL=${DIB_STACKML_PIP_INDEX_URL:-}
