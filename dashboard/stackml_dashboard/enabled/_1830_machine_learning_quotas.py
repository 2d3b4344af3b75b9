PANEL = "quotas"
PANEL_DASHBOARD = "machine_learning"
PANEL_GROUP = "usage"
ADD_PANEL = "stackml_dashboard.content.quotas.panel.Quotas"
