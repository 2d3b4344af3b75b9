import horizon
from django.utils.translation import gettext_lazy as _


class Schedules(horizon.Panel):
    name = _("Schedules")
    slug = "schedules"
    permissions = ("openstack.services.machine-learning",)
