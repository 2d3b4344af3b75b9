import horizon
from django.utils.translation import gettext_lazy as _


class Endpoints(horizon.Panel):
    name = _("Endpoints")
    slug = "endpoints"
    permissions = ("openstack.services.machine-learning",)
