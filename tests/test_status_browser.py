"""The status page in a real headless browser (Debian's chromium and chromium-driver, driven by Selenium) against
`scep serve`: the public page after an enrollment, its screenshot for the README, a stopped Key Vault (emulator)
shown as failing by the page's own refresh, and the admin part: sign in with the credential `scep serve` prints,
find an enrolled device's certificate, revoke it from the page (screenshot for the operations guide).

Selenium is given /usr/bin/chromedriver explicitly, so Selenium Manager never looks for (or downloads) a driver.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scep.core.der import fingerprint
from scep.core.protocol import PkiStatus
from scep.http.status import ADMIN_PATH, PROBE_TIMEOUT_SECONDS, REFRESH_SECONDS
from scep.tools.client import ScepClient, make_csr, new_enrollment
from tests.conftest import CHALLENGE
from tests.emulators.keyvault import KeyVaultEmulator
from tests.serverproc import REPO_ROOT, ScepServer
from tests.vault_helpers import emulated_vault, init_ca, unique_certificate_names

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e .[test] (selenium)")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO_ROOT / "docs" / "images" / "status.png"
ADMIN_SCREENSHOT = REPO_ROOT / "docs" / "images" / "status-admin.png"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1100,1300",
)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("install the Debian packages chromium and chromium-driver (.ci/run does)")
    profile = tempfile.mkdtemp(prefix="scep-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _enrol(server: ScepServer, keys, name: str) -> None:
    client = ScepClient(server.scep_url)
    ra, _ = client.ca_certificates()
    key = keys.new()
    result = client.enroll(new_enrollment(key, make_csr(key, name, CHALLENGE)), ra)
    assert result.status is PkiStatus.SUCCESS


def _health_row(driver: webdriver.Chrome, name: str) -> str:
    for row in driver.find_elements(By.CSS_SELECTOR, "#health tr"):
        if row.find_element(By.TAG_NAME, "th").text == name:
            return row.find_element(By.CSS_SELECTOR, "td").text
    raise AssertionError(f"no health line {name!r} in {driver.page_source[:2000]}")


def test_public_status_page_shows_the_ca_and_healthy_backends(browser, keys):
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}) as server:
        _enrol(server, keys, "browser-device")
        browser.get(server.url + "/status")
        ca_fingerprint = fingerprint(_ca_certificate(server))
        assert ca_fingerprint in browser.find_element(By.TAG_NAME, "body").text
        assert browser.find_element(By.ID, "overall").text == "ok"
        assert _health_row(browser, "Key custody") == "ok" and _health_row(browser, "Store") == "ok"
        assert browser.find_element(By.ID, "scep-url").text == server.scep_url
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
        assert "browser-device" not in browser.page_source  # no device data on the public page


def test_admin_signs_in_finds_the_device_and_revokes_it(browser, keys):
    with ScepServer(env={"SCEP_CHALLENGE": CHALLENGE}) as server:
        _enrol(server, keys, "lobby-kiosk-01")
        _enrol(server, keys, "meeting-room-display-07")
        printed = re.search(r"Authorization: Bearer (\S+)", server.stdout)
        assert printed is not None, server.output_tail()
        browser.get(server.url + ADMIN_PATH)
        browser.find_element(By.NAME, "credential").send_keys(printed.group(1))
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        counted = WebDriverWait(browser, 10).until(lambda driver: driver.find_element(By.ID, "count-issued-0"))
        assert counted.text == "2", browser.page_source[:3000]
        Select(browser.find_element(By.NAME, "by")).select_by_value("subject")
        browser.find_element(By.NAME, "q").send_keys("CN=lobby-kiosk")
        browser.find_element(By.CSS_SELECTOR, "#search button").click()
        found = WebDriverWait(browser, 10)
        rows = found.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#results tbody tr"))
        assert len(rows) == 1 and "CN=lobby-kiosk-01" in rows[0].text
        assert rows[0].find_element(By.CLASS_NAME, "status").text == "issued"
        serial = rows[0].get_attribute("data-serial")
        ADMIN_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ADMIN_SCREENSHOT))
        assert printed.group(1) not in browser.page_source  # the credential never reaches the page
        Select(rows[0].find_element(By.NAME, "reason")).select_by_value("keyCompromise")
        rows[0].find_element(By.CSS_SELECTOR, "form.revoke button").click()
        notice = WebDriverWait(browser, 10).until(lambda driver: driver.find_element(By.ID, "notice"))
        assert f"Certificate {serial} revoked (keyCompromise)" in notice.text
        row = browser.find_element(By.CSS_SELECTOR, f"#results tr[data-serial='{serial}']")
        assert row.find_element(By.CLASS_NAME, "status").text.startswith("revoked")
        assert not row.find_elements(By.CSS_SELECTOR, "form.revoke")
        browser.get(f"{server.url}{ADMIN_PATH}?by=serial&q={serial}")  # a fresh read from the store
        assert browser.find_element(By.CSS_SELECTOR, "#results .status").text.startswith("revoked")


def _ca_certificate(server: ScepServer):
    from cryptography import x509

    return x509.load_pem_x509_certificate(server.ca_pem_path.read_bytes())


@pytest.fixture(scope="module")
def vault_environment() -> Iterator[tuple[KeyVaultEmulator, dict[str, str]]]:
    with emulated_vault(**unique_certificate_names(), SCEP_CHALLENGE=CHALLENGE) as (vault, environment):
        init_ca(environment, "CN=Status Page Vault Root")
        yield vault, environment


def test_a_stopped_vault_shows_failing_within_one_refresh(browser, vault_environment):
    vault, environment = vault_environment
    with ScepServer(env=environment) as server:
        browser.get(server.url + "/status")
        assert _health_row(browser, "Key custody") == "ok"
        vault.stop()
        try:
            stopped = time.monotonic()
            # No navigation here: the page's own refresh must bring the news.
            deadline = stopped + REFRESH_SECONDS + PROBE_TIMEOUT_SECONDS + 3
            while time.monotonic() < deadline and _custody_state(browser) != "failing":
                time.sleep(0.5)
            assert _custody_state(browser) == "failing", browser.page_source[:3000]
            assert browser.find_element(By.ID, "overall").text == "failing"
            assert "Status Page Vault Root" in browser.page_source  # the last known CA is still shown
        finally:
            vault.start()


def _custody_state(driver: webdriver.Chrome) -> str:
    try:
        return _health_row(driver, "Key custody")
    except (WebDriverException, AssertionError):  # the page is being replaced by its refresh at this moment
        return "reloading"
