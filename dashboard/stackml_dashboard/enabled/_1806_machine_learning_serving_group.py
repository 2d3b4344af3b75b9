from django.utils.translation import gettext_lazy as _

PANEL_GROUP = "serving"
PANEL_GROUP_NAME = _("Serving")
PANEL_GROUP_DASHBOARD = "machine_learning"
