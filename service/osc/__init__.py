"""The `openstack ml ...` commands: an osc-lib plugin of python-openstackclient.

Registered through the entry points of pyproject.toml: `openstack.cli.extension` names
`service.osc.plugin` (the client factory and the global options), `openstack.ml.v1` the
commands. The commands talk to the stackml API with `service.client.StackMLClient`, found in
the Keystone catalog (service type `machine-learning`) and authenticated with the token of the
`openstack` command's own keystoneauth session (clouds.yaml, OS_* variables)."""
