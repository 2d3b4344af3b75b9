# shellcheck shell=bash
# Nova hands cloud-init its metadata on a config drive or over the metadata service.
export DIB_CLOUD_INIT_DATASOURCES=${DIB_CLOUD_INIT_DATASOURCES:-"ConfigDrive, OpenStack"}
# The python3 the image must have (the runner and the runtime venvs use it).
export DIB_STACKML_PYTHON_VERSION=${DIB_STACKML_PYTHON_VERSION:-3.11}
# The runner to bake in (empty: workers/vm/runner.py of this repository).
export DIB_STACKML_RUNNER=${DIB_STACKML_RUNNER:-}
