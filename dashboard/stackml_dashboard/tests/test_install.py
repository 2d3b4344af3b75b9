"""`stackml-dashboard-enable`: the enabled files into (and out of) a Horizon's directory."""

from __future__ import annotations

import contextlib
import io
import tempfile
import unittest
from pathlib import Path

from stackml_dashboard import install


class InstallTests(unittest.TestCase):
    def test_copies_and_removes_the_enabled_files(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp)
            (target / "_1000_project.py").write_text("# Horizon's own\n")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertEqual(install.main([str(target)]), 0)
            names = sorted(p.name for p in target.iterdir())
            self.assertIn("_1800_machine_learning.py", names)
            self.assertIn("_1810_machine_learning_jobs.py", names)
            self.assertEqual(len(names), len(install.enabled_files()) + 1)
            self.assertIn("_1810_machine_learning_jobs.py ->", out.getvalue())
            with contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(install.main([str(target), "--remove"]), 0)
            self.assertEqual([p.name for p in target.iterdir()], ["_1000_project.py"])

    def test_a_missing_directory_is_an_error(self) -> None:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(install.main(["/nonexistent/enabled"]), 1)
        self.assertIn("no such directory", err.getvalue())

    def test_default_target_is_horizons_local_enabled(self) -> None:
        self.assertEqual(
            install.default_target().parts[-3:], ("openstack_dashboard", "local", "enabled")
        )
