"""The "Machine Learning" dashboard: one panel group of stackml's panels."""

import horizon
from django.utils.translation import gettext_lazy as _


class MachineLearning(horizon.Dashboard):
    name = _("Machine Learning")
    slug = "machine_learning"
    panels = ()  # the enabled files add them
    default_panel = "jobs"
    # shown only where the catalog has stackml's API
    permissions = ("openstack.services.machine-learning",)


horizon.register(MachineLearning)
