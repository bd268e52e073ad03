"""The playground at /ui and the endpoints it reads (/v1/adapters, /v1/adapters/{name},
/v1/stats): plain HTTP tests of auth and content against the engine and the CLI's inspect, then a
real headless Chromium (Debian's, driven by Selenium through Debian's chromedriver) against a real
server on 127.0.0.1, whose page is checked against the API's own answers.

Set LORAFLEET_SCREENSHOTS=docs/img to write the screenshots shown in docs/serve.md.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lorafleet.lora.peft_format import inspect_adapter

from .conftest import ADAPTER_NAMES

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PROMPT = "to be or not"


def get(server, path, key="sk-admin"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(server.url + path, headers=headers, timeout=30)


def model_ids(server, key):
    resp = get(server, "/v1/models", key)
    assert resp.status_code == 200, resp.text
    return [m["id"] for m in resp.json()["data"]]


# ---- plain HTTP --------------------------------------------------------------------------------

def test_ui_files_served_without_a_key_and_fetch_nothing_elsewhere(server):
    resp = httpx.get(server.url + "/ui", timeout=30)
    assert resp.status_code == 308 and resp.headers["location"] == "/ui/"
    page = get(server, "/ui/", key=None)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp
    for name, media in (("app.js", "text/javascript"), ("app.css", "text/css")):
        resp = get(server, f"/ui/{name}", key=None)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(media)
        # Offline machines: nothing may come from another origin (CDN, fonts).
        assert not any(url in resp.text for url in ("http://", "https://", "//cdn"))
        assert name in page.text
    # The key never goes into a cookie or localStorage (it would outlive the tab).
    script = get(server, "/ui/app.js", key=None).text
    assert "sessionStorage" in script and "localStorage" not in script and "cookie" not in script
    for bad in ("/ui/missing.js", "/ui/..%2Fserver.py", "/ui/%2e%2e/state.py"):
        resp = get(server, bad, key=None)
        assert resp.status_code == 404 and "error" in resp.json(), bad


@pytest.mark.parametrize("key", ["sk-admin", "sk-alpha", "sk-none"])
def test_adapter_list_is_what_models_lists_for_the_key(server, key):
    listed = get(server, "/v1/adapters", key)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert [row["id"] for row in body["data"]] == model_ids(server, key)[1:]
    assert body["can_manage"] is (key == "sk-admin")
    if key == "sk-alpha":
        assert [row["id"] for row in body["data"]] == ["alpha"]


def test_adapter_rows_match_the_engine_and_the_files(server):
    engine = server.engine
    rows = {row["id"]: row for row in get(server, "/v1/adapters").json()["data"]}
    page_bytes = engine.stats()["page_bytes"]
    for name in ADAPTER_NAMES:
        info = inspect_adapter(server.adapter_dir / name)
        spec = engine.cache.specs[name]
        row = rows[name]
        assert row["registered"] and row["rank"] == info["r"] == spec.max_rank
        assert row["targets"] == info["module_types"] == ["q_proj", "v_proj"]
        assert row["modules"] == info["adapted_modules"]
        assert row["size_bytes"] == spec.num_pages * page_bytes
        assert row["tier"] in {"pool", "host", "disk"}
    # A folder of --adapter-dir no request has named yet is listed, unread.
    gamma = rows["gamma"]
    if not gamma["registered"]:
        assert gamma["tier"] == "disk" and gamma["rank"] is None


def test_a_request_makes_its_adapter_resident_and_recently_used(server, client):
    before = time.time()
    client.completions.create(model="beta", prompt=PROMPT, max_tokens=3, temperature=0)
    row = next(r for r in get(server, "/v1/adapters").json()["data"] if r["id"] == "beta")
    assert before <= row["last_used"] <= time.time()
    assert row["in_use"] == 0
    # The engine keeps an adapter resident until the pool needs its pages.
    assert row["tier"] == "pool" and "beta" in server.engine.cache.resident


def test_inspect_equals_the_cli_and_respects_the_key(server, capsys):
    from lorafleet.cli import main

    assert main(["adapters", "inspect", str(server.adapter_dir / "alpha"), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    resp = get(server, "/v1/adapters/alpha", "sk-alpha")
    assert resp.status_code == 200, resp.text
    served = resp.json()
    assert served.pop("id") == "alpha" and served.pop("object") == "adapter"
    assert served.pop("path") == "alpha"          # the folder's name, not the server's layout
    cli.pop("path")
    assert served == cli
    # A key that may not use beta cannot tell it from a name that does not exist.
    hidden, missing = get(server, "/v1/adapters/beta", "sk-alpha"), get(
        server, "/v1/adapters/no-such", "sk-alpha")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
    assert get(server, "/v1/adapters/alpha", key=None).status_code == 401
    wrong = get(server, "/v1/adapters/alpha", "sk-wrong")
    assert wrong.json()["error"]["code"] == "invalid_api_key"


def test_inspect_of_a_folder_gone_from_disk_is_a_clear_400(server):
    folder = server.adapter_dir / "delta-gone"
    shutil.copytree(server.adapter_dir / "gamma", folder)
    admin = {"Authorization": "Bearer sk-admin"}
    loaded = httpx.post(server.url + "/v1/load_lora_adapter", headers=admin, timeout=30,
                        json={"lora_name": "delta-gone", "lora_path": "delta-gone"})
    assert loaded.status_code == 200, loaded.text
    shutil.rmtree(folder)
    try:
        resp = get(server, "/v1/adapters/delta-gone")
        error = resp.json()["error"]
        assert resp.status_code == 400 and error["code"] == "adapter_unreadable"
        assert str(server.adapter_dir) not in error["message"]
    finally:
        httpx.post(server.url + "/v1/unload_lora_adapter", headers=admin, timeout=30,
                   json={"lora_name": "delta-gone"})


def test_stats_needs_a_key_and_reports_the_engine(server, client):
    assert get(server, "/v1/stats", key=None).json()["error"]["code"] == "missing_api_key"
    first = get(server, "/v1/stats", "sk-none").json()
    assert set(first["engine"]) == set(server.engine.stats())
    client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    second = get(server, "/v1/stats", "sk-none").json()
    assert second["engine"]["generated_tokens"] - first["engine"]["generated_tokens"] == 4
    assert second["time"] >= first["time"]
    # /metrics is unchanged: open, Prometheus text.
    metrics = httpx.get(server.url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and "lorafleet_" in metrics.text


def test_stats_report_the_callers_own_quota(server, client, tokenizer):
    from lorafleet.api.auth import Grant, key_id

    # A key with limits, added to this module's server only.
    grant = Grant(frozenset({"alpha"}), key_id("sk-limited"), max_concurrent=2,
                  tokens_per_minute=6000)
    keys = server_keys(server)
    keys.grants["sk-limited"] = grant
    try:
        usage = get(server, "/v1/stats", "sk-limited").json()["key"]
        assert usage == {"key_id": grant.key_id, "max_concurrent": 2, "in_flight": 0,
                         "tokens_per_minute": 6000, "tokens_available": 6000.0}
        limited = client.with_options(api_key="sk-limited")
        start = time.monotonic()
        limited.completions.create(model="alpha", prompt=PROMPT, max_tokens=4,
                                   extra_body={"ignore_eos": True})
        usage = get(server, "/v1/stats", "sk-limited").json()["key"]
        used = len(tokenizer.encode(PROMPT)) + 4
        refilled = (time.monotonic() - start) * 6000 / 60
        assert 6000 - used <= usage["tokens_available"] <= 6000 - used + refilled
        assert usage["in_flight"] == 0
        # Another key sees its own (no limits), not this one's.
        assert get(server, "/v1/stats", "sk-admin").json()["key"]["tokens_per_minute"] is None
    finally:
        del keys.grants["sk-limited"]


def server_keys(server):
    """The running app's ApiKeys (uvicorn's config holds the app)."""
    return server.server.config.app.state.lorafleet.config.api_keys


def test_only_admin_keys_may_load(server):
    resp = httpx.post(server.url + "/v1/load_lora_adapter", timeout=30,
                      headers={"Authorization": "Bearer sk-alpha"},
                      json={"lora_name": "gamma-x", "lora_path": "gamma"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_admin"


# ---- a real browser ----------------------------------------------------------------------------

def browser_problem() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return (f"{path} is missing: `make test` installs Debian's chromium and "
                    f"chromium-driver as root; that did not happen here")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def test_browser_tests_say_why_they_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "none")
    problem = browser_problem()
    assert problem is not None and str(tmp_path / "none") in problem and "make test" in problem


@pytest.fixture(scope="module")
def browser():
    problem = browser_problem()
    if problem:
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--force-prefers-reduced-motion"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def open_with_key(driver, server, key, view="compare"):
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    driver.get(f"{server.url}/ui/#{view}")
    js(driver, "sessionStorage.clear()")
    driver.refresh()
    driver.find_element("id", "api-key").send_keys(key)
    driver.find_element("id", "key-save").click()
    wait_for(lambda: js(driver, "return document.querySelectorAll('#model-choices input').length"),
             what="the model list")


def run_compare(driver, what):
    driver.find_element("id", "run").click()
    wait_for(lambda: js(driver, "return document.querySelector('#columns').dataset.state")
             == "done", what=what)


def shown_models(driver):
    return js(driver, "return [...document.querySelectorAll('#model-choices input')]"
                      ".map(i => i.value)")


def shown_adapters(driver):
    return js(driver, "return [...document.querySelectorAll('#adapter-table tbody tr')]"
                      ".map(r => r.dataset.adapter)")


def test_browser_compare_streams_what_the_completions_api_answers(browser, server, client):
    open_with_key(browser, server, "sk-admin")
    assert shown_models(browser) == model_ids(server, "sk-admin")
    chosen = ["base", "alpha", "beta"]
    js(browser, """for (const box of document.querySelectorAll('#model-choices input'))
                     box.checked = arguments[0].includes(box.value);""", chosen)
    for field, value in (("prompt", PROMPT), ("temperature", "0"), ("max-tokens", "8")):
        element = browser.find_element("id", field)
        element.clear()
        element.send_keys(value)
    run_compare(browser, "the comparison to finish")
    columns = js(browser, """return [...document.querySelectorAll('#columns .column')].map(c => ({
        model: c.dataset.model, state: c.dataset.state,
        text: c.querySelector('.output').textContent,
        tokens: c.querySelector('[data-metric=tokens]').textContent,
        ttft: c.querySelector('[data-metric=ttft]').textContent,
        rate: c.querySelector('[data-metric=rate]').textContent}))""")
    assert [c["model"] for c in columns] == chosen
    for column in columns:
        answer = client.completions.create(model=column["model"], prompt=PROMPT, max_tokens=8,
                                           temperature=0)
        assert column["state"] == "done"
        assert column["text"] == answer.choices[0].text
        assert int(column["tokens"]) == answer.usage.completion_tokens
        assert column["ttft"].endswith(" ms") and float(column["ttft"][:-3]) >= 0
        if answer.usage.completion_tokens > 1:
            assert float(column["rate"]) > 0
    # The adapters differ from the base (random B), so the columns are not all the same.
    assert len({c["text"] for c in columns}) > 1
    # Every sampling control reaches the request: seeded sampling equals the API's.
    sampling = {"temperature": 0.9, "top_p": 0.95, "top_k": 20, "seed": 7}
    for field, value in sampling.items():
        element = browser.find_element("id", field.replace("_", "-"))
        element.clear()
        element.send_keys(str(value))
    run_compare(browser, "the seeded comparison")
    texts = js(browser, "return [...document.querySelectorAll('#columns .output')]"
                        ".map(o => o.textContent)")
    answers = [client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                         extra_body={"top_k": 20}, temperature=0.9,
                                         top_p=0.95, seed=7).choices[0].text
               for model in chosen]
    assert texts == answers


def test_browser_chat_compare_equals_the_chat_api(browser, server, client):
    open_with_key(browser, server, "sk-alpha")
    browser.find_element("css selector", "input[name=mode][value=chat]").click()
    assert js(browser, "return document.querySelector('#system').hidden") is False
    for field, value in (("system", "Answer briefly."), ("prompt", PROMPT),
                         ("temperature", "0"), ("max-tokens", "6")):
        element = browser.find_element("id", field)
        element.clear()
        element.send_keys(value)
    run_compare(browser, "the chat comparison")
    texts = dict(js(browser, """return [...document.querySelectorAll('#columns .column')]
        .map(c => [c.dataset.model, c.querySelector('.output').textContent])"""))
    assert list(texts) == ["base", "alpha"]        # the key's models, all ticked by default
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": PROMPT}]
    alpha_client = client.with_options(api_key="sk-alpha")
    for model, text in texts.items():
        answer = alpha_client.chat.completions.create(model=model, messages=messages,
                                                      max_tokens=6, temperature=0)
        assert text == answer.choices[0].message.content


def test_browser_shows_api_errors_as_they_come(browser, server):
    browser.get(f"{server.url}/ui/")
    js(browser, "sessionStorage.clear()")
    browser.refresh()
    browser.find_element("id", "api-key").send_keys("sk-wrong")
    browser.find_element("id", "key-save").click()
    alert = wait_for(lambda: js(browser, "return document.querySelector('#errors').textContent"),
                     what="an error")
    assert "401" in alert and "invalid API key" in alert
    assert js(browser, "return document.querySelector('#errors').getAttribute('role')") == "alert"


def test_browser_adapters_load_inspect_unload(browser, server):
    open_with_key(browser, server, "sk-admin", view="adapters")
    wait_for(lambda: shown_adapters(browser), what="the adapter table")
    assert shown_adapters(browser) == model_ids(server, "sk-admin")[1:]
    browser.find_element("id", "load-name").send_keys("gamma-ui")
    browser.find_element("id", "load-path").send_keys("gamma")
    browser.find_element("id", "load-submit").click()
    wait_for(lambda: "gamma-ui" in shown_adapters(browser), what="the loaded adapter's row")
    assert "gamma-ui" in model_ids(server, "sk-admin")
    assert shown_adapters(browser) == model_ids(server, "sk-admin")[1:]
    # Inspect shows the API's answer, field by field.
    browser.find_element("css selector", "tr[data-adapter=gamma-ui] [data-action=inspect]").click()
    wait_for(lambda: js(browser, "return !document.querySelector('#inspect').hidden"),
             what="the inspect panel")
    fields = js(browser, """return Object.fromEntries([...document.querySelectorAll(
        '#inspect-fields dd')].map(d => [d.dataset.field, d.textContent]))""")
    served = get(server, "/v1/adapters/gamma-ui").json()
    assert fields["r"] == str(served["r"]) and fields["parameters"] == str(served["parameters"])
    assert fields["target_modules"] == json.dumps(served["target_modules"], separators=(",", ":"))
    browser.find_element("css selector", "tr[data-adapter=gamma-ui] [data-action=unload]").click()
    wait_for(lambda: "gamma-ui" not in shown_adapters(browser), what="the row to go")
    assert "gamma-ui" not in model_ids(server, "sk-admin")
    assert "gamma-ui" not in server.engine.adapters()


def test_browser_restricted_key_sees_only_its_adapters(browser, server):
    open_with_key(browser, server, "sk-alpha", view="adapters")
    wait_for(lambda: shown_adapters(browser), what="the adapter table")
    assert shown_adapters(browser) == ["alpha"] == model_ids(server, "sk-alpha")[1:]
    assert shown_models(browser) == ["base", "alpha"]
    assert js(browser, "return document.querySelector('#load-form').hidden")
    assert not browser.find_elements("css selector", "[data-action=unload]")


def test_browser_dashboard_and_keyboard(browser, server, client):
    open_with_key(browser, server, "sk-admin")
    tab = browser.find_element("id", "tab-compare")
    tab.click()
    from selenium.webdriver.common.keys import Keys
    tab.send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element.get_attribute("id") == "tab-adapters"
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert browser.find_element("id", "tab-dashboard").get_attribute("aria-selected") == "true"
    assert js(browser, "return document.querySelector('#view-dashboard').hidden") is False
    client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0)
    wait_for(lambda: browser.find_elements("css selector", "#stats-table tbody tr"),
             what="the stats table")
    shown = js(browser, """return Object.fromEntries([...document.querySelectorAll(
        '#stats-table tbody tr')].map(r => [r.dataset.key, r.querySelector('td').textContent]))""")
    engine_keys = set(server.engine.stats())
    assert engine_keys <= set(shown)
    # Values that do not move while idle match the API's.
    api = get(server, "/v1/stats").json()["engine"]
    for key in ("pages_total", "page_bytes", "adapters_registered"):
        assert shown[key].replace(",", "") == str(api[key])
    # Every chart whose keys the engine reports is drawn, with its latest values in the legend.
    wait_for(lambda: len(browser.find_elements(
        "css selector", ".chart:not([hidden]) .legend li")) >= 4,
             what="the charts")
    legend = js(browser, """return Object.fromEntries([...document.querySelectorAll(
        '#chart-pages .legend li')].map(l => [l.dataset.series, l.textContent]))""")
    assert legend["adapters"] == f"adapters: {api['pages_adapter']:,}"
    assert legend["KV cache"] == f"KV cache: {api['pages_kv']:,}"
    blank = js(browser, """const c = document.querySelector('#chart-pages canvas');
        const b = document.createElement('canvas'); b.width = c.width; b.height = c.height;
        return c.toDataURL() === b.toDataURL();""")
    assert not blank


def send_traffic(client, seconds: float, clients: int = 4) -> None:
    """Completions from `clients` threads to the base and the adapters for `seconds`."""
    deadline = time.monotonic() + seconds

    def loop(i):
        models = ["base", "alpha", "beta", "gamma"]
        while time.monotonic() < deadline:
            client.completions.create(model=models[i % 4], prompt=PROMPT, max_tokens=24,
                                      extra_body={"ignore_eos": True})
            i += 1
            time.sleep(0.2 * (i % 3))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}


@pytest.mark.slow
def test_browser_screenshots_desktop_and_phone(browser, server, client, tmp_path):
    """Every view at laptop and phone width (written to LORAFLEET_SCREENSHOTS when set); on a
    phone nothing may overflow the viewport sideways."""
    out = Path(os.environ.get("LORAFLEET_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    for device in ("desktop", "phone"):
        open_with_key(browser, server, "sk-admin")
        if device == "phone":
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
        js(browser, """for (const box of document.querySelectorAll('#model-choices input'))
                         box.checked = ['base', 'alpha', 'beta'].includes(box.value);""")
        run_compare(browser, "the comparison")
        shots = {"compare": None, "adapters": "tab-adapters", "dashboard": "tab-dashboard"}
        for view, tab in shots.items():
            if tab:
                browser.find_element("id", tab).click()
            if view == "adapters":
                wait_for(lambda: shown_adapters(browser), what="the adapter table")
                browser.find_element("css selector",
                                     "tr[data-adapter=alpha] [data-action=inspect]").click()
                wait_for(lambda: js(browser, "return !document.querySelector('#inspect').hidden"),
                         what="inspect")
            if view == "dashboard":
                # For the docs, a while of traffic from a few clients; a glimpse otherwise.
                traffic_s = 20 if os.environ.get("LORAFLEET_SCREENSHOTS") else 1.5
                browser.find_element("css selector", "#poll-interval option[value='500']").click()
                send_traffic(client, traffic_s)
            js(browser, "window.scrollTo(0, 0)")
            overflow = js(browser, "return document.documentElement.scrollWidth"
                                   " - window.innerWidth")
            assert overflow <= 1, f"{view} on {device}: {overflow}px wider than the screen"
            path = out / f"ui-{view}-{device}.png"
            body = browser.find_element("tag name", "body")
            if device == "desktop":
                body.screenshot(str(path))
            else:
                browser.save_screenshot(str(path))
            assert path.stat().st_size > 5000
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
