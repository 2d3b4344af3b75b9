"""The Horizon plugin in a real browser: real Horizon (runserver, the plugin's enabled files)
against the devcloud's real Keystone, a running stackml (auth=keystone, the openstack backend
on the Nova emulator, Swift), driven by headless Chromium through Selenium.

A member of `demo` logs in, uploads the example trainer (examples/keras_regression) through
the Jobs form, watches the job reach SUCCEEDED on its page (state timeline, log tail, metric
charts), sees its usage, finds the version it registered READY on the Models panel, deploys
it, watches the endpoint's replica get ready on the Endpoints panel, predicts through the
predict form, deletes the endpoint, makes a schedule from the job and pauses, resumes and
deletes it; a member of another project sees none of it (the API's not_found). Screenshots of
each step and Horizon's log are kept in a directory the test prints.

Chromium, chromedriver and Horizon are required: the test fails (never skips) without them;
`.ci/run` installs Debian's chromium + chromium-driver, and Horizon's virtualenv is built once
per machine (devcloud/venvs.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devcloud import horizon as hz
from devcloud import keystone, venvs
from devcloud.cloud import DevCloud
from service.client import StackMLClient, build_package
from service.config import Settings
from service.platform import LocalPlatform
from tests.cloud.conftest import REPO_ROOT, RUNTIME_ROOT, VENV_ROOT, scratch_dir
from tests.envutil import environ, free_port, wait_sandboxes_gone
from tests.pgutil import temp_database

REDIS_URL = "redis://127.0.0.1:6379/12"
CHROMIUM = os.environ.get("STACKML_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("STACKML_CHROMEDRIVER", "/usr/bin/chromedriver")
HORIZON_READY_DEADLINE = 90.0
JOB_DEADLINE = 150.0
EPOCHS = 3
ROWS = 2000  # the example's synthetic data: small, a quick fit
ENDPOINT_DEADLINE = 150.0
MODEL = "horizon-demo"


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(
            f"the browser test needs {', '.join(missing)}: "
            "`apt-get install -y --no-install-recommends chromium chromium-driver` "
            "(.ci/run installs them)",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def artifacts() -> Path:
    """Where the screenshots (and Horizon's log) are kept after the run."""
    root = Path(os.environ.get("STACKML_TEST_ARTIFACTS", "/var/tmp/stackml-artifacts"))
    path = root / f"horizon-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {path}")
    return path


@pytest.fixture(scope="module")
def platform(devcloud_emulator: DevCloud) -> Iterator[tuple[LocalPlatform, DevCloud]]:
    """stackml as deployed on OpenStack: Keystone auth, everything scoped to the user's
    project."""
    _require_browser()  # before anything starts
    cloud = devcloud_emulator
    data = scratch_dir("horizon-platform")
    authtoken = {
        "auth_url": cloud.auth_url,
        "username": "stackml",
        "password": cloud.password("stackml"),
        "project_name": "service",
        "region_name": keystone.REGION,
        "token_cache_time": "-1",
    }
    with temp_database("horizon") as db_url:
        env = {
            "STACKML_DATA_DIR": str(data),
            "STACKML_DATABASE_URL": db_url,
            "STACKML_REDIS_URL": REDIS_URL,
            "STACKML_QUEUE": f"stackml-horizon-{os.getpid()}",
            "STACKML_PORT": str(free_port()),
            "STACKML_RUNTIME_ROOT": str(RUNTIME_ROOT),
            "STACKML_AUTH": "keystone",
            "STACKML_KEYSTONE_AUTHTOKEN": json.dumps(authtoken),
            # servers in stackml's own project; every record still the user's project's
            # (`tenancy: project` refuses schedules, which the test creates too)
            "STACKML_TENANCY": "service",
            "STACKML_COMPUTE": "openstack",
            "STACKML_STORE": "swift",
            "OS_CLIENT_CONFIG_FILE": str(cloud.clouds_yaml),
            "STACKML_OPENSTACK_CLOUD": "devcloud-stackml",
            "STACKML_DEFAULT_FLAVOR": "m1.small",
            "STACKML_BOOT_DEADLINE": "30",
            "STACKML_RECONCILE_INTERVAL": "2",
        }
        try:
            with environ(env), LocalPlatform(Settings(), concurrency=2, quiet=True) as p:
                yield p, cloud
        finally:
            shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def horizon(platform: tuple[LocalPlatform, DevCloud], artifacts: Path) -> Iterator[str]:
    """Horizon 27 under `runserver`, logging in against the devcloud's Keystone, whose catalog
    names this stackml as the `machine-learning` service."""
    p, cloud = platform
    # the plugin finds the API through the catalog, as in a real cloud
    cloud.register_stackml(p.url)
    venv = venvs.ensure_venv(VENV_ROOT, "horizon", venvs.HORIZON_REQUIREMENTS, echo=print)
    work = scratch_dir("horizon")
    hz.write_settings(work, cloud.auth_url)
    port = free_port()
    log = work / "horizon.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            hz.server_command(venv, "127.0.0.1", port),
            cwd=work,
            env=hz.server_env(work),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + HORIZON_READY_DEADLINE
        while True:
            assert proc.poll() is None, f"horizon exited: {log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/auth/login/", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"horizon not ready: {log.read_text()[-3000:]}"
            time.sleep(0.3)
        print(f"horizon at {url}; log {log}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        if log.exists():
            shutil.copyfile(log, artifacts / "horizon.log")
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaks(platform: tuple[LocalPlatform, DevCloud]) -> Iterator[None]:
    """Nothing the job booted is left: no server in Nova, no sandbox under the emulator."""
    yield
    from service.backends.compute.sandbox import leak_report

    cloud = platform[1]
    admin = cloud.connection("devcloud")
    deadline = time.monotonic() + 30
    while True:
        servers = [s.name for s in admin.compute.servers(all_projects=True)]
        if not servers or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert servers == []
    wait_sandboxes_gone(cloud.sandbox_root, 30)
    assert leak_report(cloud.sandbox_root) == []


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _package(path: Path) -> Path:
    """The example trainer (examples/keras_regression) as the .tar.gz a user would upload."""
    with path.open("wb") as out:
        build_package(REPO_ROOT / "examples" / "keras_regression", out)
    return path


def _login(driver: Any, horizon: str, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{horizon}/auth/login/?next=/machine_learning/")
    driver.find_element(By.ID, "id_username").send_keys(user)
    driver.find_element(By.ID, "id_password").send_keys(password)
    driver.find_element(By.ID, "loginBtn").click()
    WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.ID, "jobs")))


def _text(driver: Any, element_id: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.ID, element_id).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""  # the page is reloading itself


def _errors(driver: Any) -> str:
    """The page's Horizon error messages (waiting a little for the page to have them)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    found = WebDriverWait(driver, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".alert-danger")
    )
    return " ".join(e.text for e in found)


def test_submit_and_watch_a_job_in_horizon(
    horizon: str,
    platform: tuple[LocalPlatform, DevCloud],
    browser: Any,
    tmp_path: Path,
    artifacts: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    p, cloud = platform
    shots = artifacts

    def shot(name: str) -> None:
        browser.save_screenshot(str(shots / f"{name}.png"))

    try:
        _login(browser, horizon, "demo", cloud.password("demo"))
        shot("01-jobs")
        assert "Machine Learning" in browser.page_source

        browser.get(f"{horizon}/machine_learning/submit/")
        browser.find_element(By.ID, "id_name").send_keys("from-horizon")
        browser.find_element(By.ID, "id_package").send_keys(str(_package(tmp_path / "p.tar.gz")))
        module = browser.find_element(By.ID, "id_module")
        module.clear()
        module.send_keys("trainer.task")
        browser.find_element(By.ID, "id_hyperparameters").send_keys(
            json.dumps({"epochs": EPOCHS, "rows": ROWS})
        )
        browser.find_element(By.ID, "id_register_as").send_keys(MODEL)
        shot("02-submit-form")
        browser.find_element(By.CSS_SELECTOR, "form input[type=submit]").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.ID, "stackml-job"))
        job_id = browser.find_element(By.ID, "stackml-job").get_attribute("data-job-id")
        assert job_id and job_id.startswith("job-"), browser.current_url
        shot("03-submitted")

        # the page follows the job by itself: log tail polling, a reload on each new state
        WebDriverWait(browser, JOB_DEADLINE, poll_frequency=0.5).until(
            lambda d: _text(d, "job-state") in ("SUCCEEDED", "FAILED", "CANCELLED")
        )
        shot("04-finished")
        assert _text(browser, "job-state") == "SUCCEEDED", _text(browser, "job-failure")
        timeline = _text(browser, "job-timeline")
        assert "RUNNING" in timeline and "SUCCEEDED" in timeline, timeline
        charts = {
            c.get_attribute("data-metric"): c
            for c in browser.find_elements(By.CSS_SELECTOR, "#job-metrics svg.stackml-chart")
        }
        assert {"loss", "val_loss"} <= set(charts), set(charts)
        for chart in charts.values():
            assert len(chart.find_elements(By.TAG_NAME, "circle")) == EPOCHS
        WebDriverWait(browser, 30).until(
            lambda d: "trainer: model exported to" in _text(d, "job-log")
        )
        browser.execute_script("document.getElementById('job-metrics').scrollIntoView()")
        shot("05-metrics-and-log")

        # the job is the user's project's, as the API says
        demo = cloud.connection("devcloud-demo")
        with StackMLClient(p.url, token=demo.session.get_token()) as api:
            assert api.get_job(job_id)["project_id"] == cloud.projects["demo"]

        browser.get(f"{horizon}/machine_learning/")
        assert job_id in browser.page_source
        shot("06-jobs-list")

        # the project's quota and the job's metered server time, read from the API
        browser.get(f"{horizon}/machine_learning/quotas/")
        quota = _text(browser, "ml-quota")
        assert "Servers" in quota and "GPUs" in quota, quota
        usage_rows = browser.find_elements(By.CSS_SELECTOR, "#job_usage tbody tr")
        assert any(job_id in r.text for r in usage_rows), [r.text for r in usage_rows]
        shot("07-quotas-and-usage")
        browser.get(f"{horizon}/machine_learning/quotas/?all_projects=1")
        assert "forbidden" in _errors(browser)  # every project's usage is an admin's

        # the job registered its model: version 1, checked READY and labelled default; deployed
        # from the Models panel, watched on the Endpoints panel, asked for predictions
        browser.get(f"{horizon}/machine_learning/models/")
        assert MODEL in _text(browser, "models")
        deadline = time.monotonic() + 60
        while True:
            browser.get(f"{horizon}/machine_learning/models/{MODEL}/")
            versions = _text(browser, "ml-versions")
            if "CREATING" not in versions or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert "READY" in versions and "default" in versions and job_id in versions, versions
        assert "first" in _text(browser, "ml-history") or "system" in _text(browser, "ml-history")
        shot("08-model")
        browser.get(f"{horizon}/machine_learning/models/{MODEL}/deploy/")
        browser.find_element(By.CSS_SELECTOR, "form input[type=submit]").click()
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "ml-model"))
        ep_link = WebDriverWait(browser, 30).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#ml-model-endpoint a")
        )[0]
        ep_url = ep_link.get_attribute("href")
        deadline = time.monotonic() + ENDPOINT_DEADLINE
        while True:
            browser.get(ep_url)
            state = _text(browser, "ml-endpoint-state")
            if state in ("READY", "FAILED") or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert state == "READY", _text(browser, "ml-endpoint")
        assert "ready" in _text(browser, "ml-replicas"), _text(browser, "ml-replicas")
        shot("09-endpoint")
        browser.get(f"{horizon}/machine_learning/endpoints/")
        assert "1/1" in _text(browser, "endpoints")
        browser.get(f"{horizon}/machine_learning/models/{MODEL}/predict/")
        rows = [[0.1 * i] * 20 for i in range(3)]
        browser.find_element(By.ID, "id_instances").send_keys(json.dumps(rows))
        browser.find_element(By.CSS_SELECTOR, "form input[type=submit]").click()
        answer = json.loads(
            WebDriverWait(browser, 30)
            .until(lambda d: d.find_elements(By.ID, "ml-predict-answer"))[0]
            .text
        )
        assert len(answer["predictions"]) == 3, answer
        assert _text(browser, "ml-served-by") == "1"
        shot("10-prediction")
        # the endpoint goes from its page (a confirmed delete)
        browser.get(ep_url)
        browser.find_element(By.CSS_SELECTOR, "#ml-endpoint .btn-danger").click()
        WebDriverWait(browser, 10).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".modal .btn-danger")
        )[0].click()
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "endpoints"))
        with StackMLClient(p.url, token=demo.session.get_token()) as api:
            ep_id = ep_url.rstrip("/").rsplit("/", 1)[1]
            assert api.get_endpoint(MODEL, ep_id)["state"] in ("DELETING", "DELETED")

        # a schedule made from the job's spec: created, paused, resumed, deleted
        browser.get(f"{horizon}/machine_learning/schedules/create/?from_job={job_id}")
        assert "package_uri" in browser.find_element(By.ID, "id_job").get_attribute("value")
        browser.find_element(By.ID, "id_name").send_keys("nightly")
        browser.find_element(By.ID, "id_cron").send_keys("0 3 * * *")
        shot("11-schedule-form")
        browser.find_element(By.CSS_SELECTOR, "form input[type=submit]").click()
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "schedules"))
        with StackMLClient(p.url, token=demo.session.get_token()) as api:
            (sched,) = api.list_schedules()
        assert sched["name"] == "nightly" and sched["cron"] == "0 3 * * *", sched
        sid = sched["id"]
        browser.find_element(By.CSS_SELECTOR, f"button[value='schedules__pause__{sid}']").click()
        WebDriverWait(browser, 30).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, f"button[value='schedules__resume__{sid}']")
        )
        with StackMLClient(p.url, token=demo.session.get_token()) as api:
            assert api.get_schedule(sid)["paused"] is True
        shot("12-schedule-paused")
        browser.find_element(By.CSS_SELECTOR, f"button[value='schedules__resume__{sid}']").click()
        WebDriverWait(browser, 30).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, f"button[value='schedules__pause__{sid}']")
        )
        browser.get(f"{horizon}/machine_learning/schedules/{sid}/")
        assert "No runs yet." in _text(browser, "ml-schedule-runs")
        browser.get(f"{horizon}/machine_learning/schedules/")
        row = browser.find_element(By.ID, f"schedules__row__{sid}")
        row.find_element(By.CSS_SELECTOR, ".dropdown-toggle").click()
        row.find_element(By.CSS_SELECTOR, f"button[value='schedules__delete__{sid}']").click()
        WebDriverWait(browser, 10).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".modal .btn-danger")
        )[0].click()
        WebDriverWait(browser, 30).until(
            lambda d: not d.find_elements(By.ID, f"schedules__row__{sid}")
        )
        with StackMLClient(p.url, token=demo.session.get_token()) as api:
            assert api.list_schedules() == []

        # another project's member sees neither the job in the list nor its page
        browser.get(f"{horizon}/auth/logout/")
        _login(browser, horizon, "alt", cloud.password("alt"))
        assert job_id not in browser.page_source
        browser.get(f"{horizon}/machine_learning/models/")
        assert MODEL not in _text(browser, "models")
        browser.get(f"{horizon}/machine_learning/models/{MODEL}/")
        assert "not_found" in _errors(browser)
        browser.get(f"{horizon}/machine_learning/{job_id}/")
        assert browser.find_elements(By.ID, "jobs"), "not sent back to the list"
        errors = _errors(browser)
        assert "not_found" in errors and "HTTP 404" in errors, errors
        shot("13-other-project")
    except BaseException:
        shot("failure")
        (shots / "failure.html").write_text(browser.page_source)
        raise
