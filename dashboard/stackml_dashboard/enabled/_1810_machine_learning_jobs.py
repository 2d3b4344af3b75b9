PANEL = "jobs"
PANEL_DASHBOARD = "machine_learning"
PANEL_GROUP = "ml"
ADD_PANEL = "stackml_dashboard.content.jobs.panel.Jobs"
