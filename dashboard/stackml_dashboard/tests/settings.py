"""Django settings of the plugin's unit tests: Horizon's own test settings plus this plugin."""

import atexit
import os
import shutil
import tempfile

# Horizon's test settings write a secret key and compressed files to the temp dir: keep them
# in one of our own (and out of a shared /tmp)
_TMP = tempfile.mkdtemp(prefix="stackml-dashboard-tests-")
os.environ["TMPDIR"] = _TMP
tempfile.tempdir = _TMP
atexit.register(shutil.rmtree, _TMP, True)

from openstack_dashboard.test.settings import *  # noqa: E402,F403

from stackml_dashboard.plugin_settings import enable  # noqa: E402

COMPRESS_ROOT = os.path.join(_TMP, "compress")
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

enable(globals()["HORIZON_CONFIG"], globals()["INSTALLED_APPS"])
