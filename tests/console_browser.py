"""Headless Chromium from Debian, driven by Selenium, for the console's browser tests: one
session per test module, every process it started (chromedriver, the browser and its
helpers) ended by pid; axe-core (npm, installed by deploy/install.sh --tests) injected into
the page for the accessibility check."""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from raftmesh.lab.processes import child_pids, proc_start_time, stop_pid
from waiting import wait_until

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
AXE = os.path.join(sys.prefix, "node", "node_modules", "axe-core", "axe.min.js")
SCREENSHOTS = os.environ.get("RAFTMESH_CONSOLE_SCREENSHOTS")  # a folder: save the pages there
BLOCKING = ("serious", "critical")

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromium-driver are not installed (deploy/install.sh --tests)")


class Browser:
    def __init__(self, log_path: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,900", "--disable-extensions", "--no-first-run"):
            options.add_argument(arg)
        self.service = Service(CHROMEDRIVER, log_output=log_path)
        self.driver = webdriver.Chrome(service=self.service, options=options)
        self.driver.set_page_load_timeout(30)
        self.driver.set_script_timeout(30)

    def close(self) -> None:
        """driver.quit() ends the browser; whatever of the tree is left is ended by pid."""
        tree, todo = [], [self.service.process.pid]
        while todo:
            pid = todo.pop()
            tree.append((pid, proc_start_time(pid)))
            todo.extend(child_pids(pid))
        try:
            self.driver.quit()
        finally:
            self.service.stop()
            for pid, started in reversed(tree):
                stop_pid(pid, started)

    # -- what the tests do ---------------------------------------------------------------
    def open(self, url: str) -> None:
        self.driver.get(url)

    def find(self, css: str):
        from selenium.webdriver.common.by import By
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str = "main") -> str:
        """The rendered text, read in one step (pages re-render while a test polls them)."""
        return self.driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)

    def wait_text(self, needle: str, css: str = "main", timeout: float = 15.0) -> str:
        return wait_until(lambda: needle in self.text(css) and self.text(css), timeout,
                          interval=0.1, what=f"{needle!r} in {css}: last {self.text(css)[:300]!r}")

    def button(self, label: str, timeout: float = 10.0):
        from selenium.webdriver.common.by import By
        xpath = f"//button[normalize-space(.)={_xpath_literal(label)}]"
        return wait_until(lambda: next(iter(self.driver.find_elements(By.XPATH, xpath)), None),
                          timeout, interval=0.1, what=f"button {label!r}")

    def buttons(self) -> list[str]:
        return self.driver.execute_script(
            "return [...document.querySelectorAll('main button')].map((b) => b.innerText);")

    def fetch(self, method: str, path: str, body=None, csrf: bool = True) -> dict:
        """A request from the page's own origin with its session (and CSRF token)."""
        return self.driver.execute_async_script("""
            const [method, path, body, csrf, done] = arguments;
            const who = await (await fetch('/ui/session')).json();
            const headers = {'Content-Type': 'application/json'};
            if (csrf) headers['X-CSRF-Token'] = who.csrf_token;
            const r = await fetch(path, {method, headers, body: body === null ? undefined : JSON.stringify(body)});
            done({status: r.status, body: await r.json()});""", method, path, body, csrf)

    def accessibility_problems(self) -> list[str]:
        """axe-core's serious and critical violations on the page as it is now."""
        if not os.path.exists(AXE):
            pytest.skip(f"axe-core is not installed at {AXE} (deploy/install.sh --tests)")
        with open(AXE) as f:
            self.driver.execute_script(f.read())
        result = self.driver.execute_async_script(
            "const done = arguments[0]; axe.run(document).then((r) => done(r.violations));")
        return [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
                for v in result if v["impact"] in BLOCKING]

    def screenshot(self, name: str) -> None:
        if SCREENSHOTS:
            os.makedirs(SCREENSHOTS, exist_ok=True)
            self.driver.save_screenshot(os.path.join(SCREENSHOTS, f"{name}.png"))

    def tab_order(self, presses: int) -> list[str]:
        """What TAB reaches, in order, from the page's first control (its skip link): tag
        and id, or text, of each."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys
        self.driver.execute_script("document.querySelector('a.skip').focus();")
        seen = []
        for _ in range(presses):
            seen.append(self.driver.execute_script(
                "const e = document.activeElement; return (e.tagName + ':' + (e.id || e.textContent || e.name || '')).trim();"))
            ActionChains(self.driver).send_keys(Keys.TAB).perform()
        return seen


def _xpath_literal(s: str) -> str:
    if "'" not in s:
        return f"'{s}'"
    return "concat(" + ", \"'\", ".join(f"'{p}'" for p in s.split("'")) + ")"
