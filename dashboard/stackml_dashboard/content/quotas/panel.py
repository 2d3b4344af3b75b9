import horizon
from django.utils.translation import gettext_lazy as _


class Quotas(horizon.Panel):
    name = _("Quotas and Usage")
    slug = "quotas"
    permissions = ("openstack.services.machine-learning",)
