"""A headless Chromium driven by Selenium, for the board's browser tests and its screenshots.

Debian's `chromium` and `chromium-driver` packages (`.ci/run` installs them where apt is
available); `missing()` says what is absent so the tests can skip with that message.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "serve")]  # also when run as a script (screenshots.py)
from serving import running  # noqa: E402 - after the path set-up above

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def binaries() -> tuple[str | None, str | None]:
    browser = next((found for name in CHROMIUM if (found := shutil.which(name))), None)
    return browser, shutil.which("chromedriver")


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    browser, driver = binaries()
    if not browser or not driver:
        return "no Chromium and chromedriver on PATH (apt-get install chromium chromium-driver)"
    return None


def start_driver(width: int = 1400, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@contextlib.contextmanager
def board_page(app):
    """(driver, page URL) of `app` served on a free loopback port."""
    with running(app) as base:
        driver = start_driver()
        try:
            yield driver, base.removesuffix("/v1") + "/"
        finally:
            driver.quit()


try:
    from selenium.common.exceptions import StaleElementReferenceException
except ImportError:  # no selenium: missing() says so and the tests skip
    StaleElementReferenceException = RuntimeError


def wait_for(driver, css: str, timeout: float = 30, count: int = 1):
    """The elements matching `css` once at least `count` are displayed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d):
        shown = [e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        return shown if len(shown) >= count else False

    # The page redraws the runs list every few seconds: an element found just before is then stale.
    return WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException]).until(found)


def click(driver, css: str, tries: int = 5) -> None:
    """Click the element matching `css`, finding it again if a redraw replaced it meanwhile."""
    from selenium.webdriver.common.by import By

    for attempt in range(tries):
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
            return
        except StaleElementReferenceException:
            if attempt == tries - 1:
                raise
