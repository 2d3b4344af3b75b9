#!/usr/bin/env python
"""Django's manage.py for the plugin (the horizon wheel has none): `python manage.py test
stackml_dashboard` runs the unit tests; `runserver --settings=...` a Horizon with the plugin."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stackml_dashboard.tests.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
