"""Fixtures shared by the whole suite."""

import os
from pathlib import Path

import pytest
import torch

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# flags every page test needs: headless, nothing fetched from outside, a profile of its own
COMMON_FLAGS = ("--headless=new", "--no-sandbox", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a thread a worker: the workers share the cores, as many as cores
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Files with slow end-to-end tests first (stable otherwise): xdist's loadfile deals files to workers in this
    order, so the longest start at once instead of leaving one worker alone with them at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture
def chromium(tmp_path):
    """Start headless Debian Chromium through Selenium with a page's own extra flags: `chromium(*flags)`."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"the browser test needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs Selenium: pip install selenium")
    drivers = []

    def start(*flags: str):
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)  # with the driver path below, Selenium Manager downloads nothing
        for flag in (*COMMON_FLAGS, *flags, f"--user-data-dir={tmp_path / 'chrome'}"):
            options.add_argument(flag)
        drivers.append(webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options))
        return drivers[-1]

    yield start
    for driver in drivers:
        driver.quit()
