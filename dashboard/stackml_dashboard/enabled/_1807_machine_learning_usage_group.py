from django.utils.translation import gettext_lazy as _

PANEL_GROUP = "usage"
PANEL_GROUP_NAME = _("Usage")
PANEL_GROUP_DASHBOARD = "machine_learning"
