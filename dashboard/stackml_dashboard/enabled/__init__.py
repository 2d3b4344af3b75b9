"""Horizon enabled files of the plugin: copy them into openstack_dashboard/local/enabled/
(`stackml-dashboard-enable` does), or pass this package to `update_dashboards`."""
