import horizon
from django.utils.translation import gettext_lazy as _


class Models(horizon.Panel):
    name = _("Models")
    slug = "models"
    permissions = ("openstack.services.machine-learning",)
