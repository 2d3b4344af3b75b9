PANEL = "models"
PANEL_DASHBOARD = "machine_learning"
PANEL_GROUP = "serving"
ADD_PANEL = "stackml_dashboard.content.models.panel.Models"
