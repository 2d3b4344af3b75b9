import horizon
from django.utils.translation import gettext_lazy as _


class Jobs(horizon.Panel):
    name = _("Jobs")
    slug = "jobs"
    permissions = ("openstack.services.machine-learning",)
