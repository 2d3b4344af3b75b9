from django.utils.translation import gettext_lazy as _

PANEL_GROUP = "ml"
PANEL_GROUP_NAME = _("Training")
PANEL_GROUP_DASHBOARD = "machine_learning"
