"""The dashboard in a real browser: login, a bag progressing live to completion with a real worker, a work's page,
a stranger refused, the admin views, the API documentation served without a CDN."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from web.webgrid import PASSWORD, Grid, log_in

pytestmark = pytest.mark.timeout(180)

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img" / "dashboard.png"


def wait_final(grid: Grid, uids: list[str], timeout: float = 60.0) -> dict[str, str]:
    """Until every work is final on the server (the client's long-poll, bounded)."""
    out = grid.alice.wait(uids, timeout=timeout)
    assert all(v in ("COMPLETED", "ERROR", "FAILED") for v in out.values()), out
    return out


def test_login_refuses_a_bad_password_with_a_readable_message(grid: Grid, context: Any) -> None:
    page = context.new_page()
    page.goto(grid.url + "/ui/")
    page.fill("#login", "alice")
    page.fill("#password", "not her password")
    page.click("button[type=submit]")
    error = page.locator("#login-error")
    error.wait_for(state="visible")
    assert error.inner_text() == "Wrong login or password."
    assert page.evaluate("sessionStorage.getItem('xwhep.session')") is None
    assert page.locator(".who .user").count() == 0  # still anonymous: no header, no data
    # and the right password gets in
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector(".who .user:text-is('alice')")


def test_a_bag_progresses_live_to_completion(grid: Grid, context: Any, tmp_path: Path) -> None:
    """The worker is paused while the bag is submitted, so the page first shows 0 of N; then the worker resumes and
    the same page (never reloaded) shows the counts grow to N of N."""
    n = 12
    label = f"bag-{uuid.uuid4().hex[:6]}"
    grid.pause.touch()
    grid.worker.wait_status(lambda s: not s["active"], what="the worker paused")
    group = grid.alice.create_bag("group", label)
    works = grid.alice.submit_bag([{"app": grid.app, "args": f"part {i}", "group": group["uid"], "label": label}
                                   for i in range(n)])
    page = context.new_page()
    log_in(page, grid.url, "alice")
    row = page.locator(f".bag[data-uid='{group['uid']}']")
    count = row.locator(".bag-count")
    count.wait_for()
    assert count.get_attribute("data-total") == str(n)
    assert count.get_attribute("data-done") == "0"
    # record every value the page shows, and mark the page: a reload would lose both
    page.evaluate("""(uid) => {
        window.__seen = [];
        window.__marker = 'same page';
        const note = () => {
            const el = document.querySelector(`.bag[data-uid='${uid}'] .bag-count`);
            if (el) window.__seen.push(Number(el.dataset.done));
        };
        new MutationObserver(note).observe(document.getElementById('bags'), {subtree: true, childList: true});
        note();
    }""", group["uid"])
    grid.pause.unlink()
    page.wait_for_function(f"""() => {{
        const el = document.querySelector(".bag[data-uid='{group['uid']}'] .bag-count");
        return el && el.dataset.done === '{n}';
    }}""", timeout=90_000)
    assert page.evaluate("window.__marker") == "same page"
    seen = page.evaluate("window.__seen")
    assert seen[0] == 0 and seen[-1] == n, seen
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert count.inner_text().startswith(f"{n} / {n} completed")
    wait_final(grid, [w["uid"] for w in works])
    # the tiles and the works-by-status chart show the completions too
    page.wait_for_function(f"""() => {{
        const t = [...document.querySelectorAll('.tile')].find((x) => x.textContent.includes('Completed'));
        return t && Number(t.querySelector('.tile-value').textContent.replace(/,/g, '')) >= {n};
    }}""")
    legend = page.locator("#chart-status .u-legend")
    assert "Completed" in legend.inner_text()
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("XW_DOCS_SCREENSHOT"):  # refresh the picture in docs/ on request
        DOCS_IMG.parent.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS_IMG)


def test_a_works_page_shows_its_life(grid: Grid, context: Any) -> None:
    marker = f"m{uuid.uuid4().hex[:8]}"
    grid.pause.unlink(missing_ok=True)
    done = grid.alice.submit(grid.app, args=f"{marker} second", label=f"life-{marker}")
    stuck = grid.alice.submit(grid.app, args="never", label=f"stuck-{marker}", min_memory=2**31 - 1)
    wait_final(grid, [done["uid"]])
    page = context.new_page()
    log_in(page, grid.url, "alice", path=f"/ui/works/{done['uid']}")
    page.wait_for_selector("h1 code")
    assert page.locator(".page-head .pill").inner_text() == "COMPLETED"
    page.wait_for_selector("#tasks table")
    assert "COMPLETED" in page.locator("#tasks").inner_text()
    events = page.locator("#events").inner_text()
    assert "work.submit" in events and "work.transition" in events
    page.wait_for_selector("#logs pre.log-stdout")
    assert f"job says: {marker} second" in page.locator("#logs pre.log-stdout").inner_text()
    assert f"to stderr: {marker}" in page.locator("#logs pre.log-stderr").inner_text()
    assert page.locator("#why").is_hidden()
    # a work no host can run says why
    page.goto(f"{grid.url}/ui/works/{stuck['uid']}")
    page.wait_for_selector("#why table")
    why = page.locator("#why").inner_text()
    assert "min_memory" in why or "memory" in why, why
    assert "blocking" in why
    grid.alice.cancel(stuck["uid"])


def test_a_stranger_sees_a_refusal_and_no_data(grid: Grid, context: Any) -> None:
    secret = f"secret-{uuid.uuid4().hex[:8]}"
    work = grid.alice.submit(grid.app, args=secret, label=secret)
    page = context.new_page()
    answers: list[tuple[str, int]] = []
    page.on("response", lambda r: answers.append((urlsplit(r.url).path, r.status)))
    log_in(page, grid.url, "bob", path=f"/ui/works/{work['uid']}")
    alert = page.locator("[role=alert] h1")
    alert.wait_for()
    assert alert.inner_text() == "Not found or not allowed"
    body = page.locator("body").inner_text()
    assert secret not in body and work["uid"][:8] not in body
    assert (f"/api/v1/works/{work['uid']}", 404) in answers
    # nor do his summaries count her works
    page.goto(grid.url + "/ui/works")
    page.wait_for_selector("#works-count")
    assert secret not in page.locator("body").inner_text()
    # and an administrator's page is refused to him
    page.goto(grid.url + "/ui/admin/users")
    page.locator("[role=alert] h1:text-is('Not allowed')").wait_for()
    assert "alice" not in page.locator("main").inner_text()
    grid.alice.delete_work(work["uid"])


def test_admin_views_list_users_and_hosts(grid: Grid, context: Any) -> None:
    conf = grid.server.conf("admin")
    page = context.new_page()
    log_in(page, grid.url, conf["login"], conf["password"], path="/ui/admin/users")
    page.wait_for_selector("#users table")
    users = page.locator("#users").inner_text()
    assert "alice" in users and "bob" in users and "SUPER_USER" in users
    page.click("nav a:text-is('Hosts')")
    page.wait_for_selector("#hosts table")
    host = grid.worker.status()["host"]
    row = page.locator("#hosts tbody tr").filter(has=page.locator(f"a[href='/ui/hosts/{host}']"))
    assert row.count() == 1
    assert row.locator(".dot.on").count() == 1  # alive
    row.locator("a").first.click()
    page.wait_for_selector(".tile-label:text-is('Done')")
    assert "Latest tasks" in page.locator("main").inner_text()


def test_pages_load_nothing_from_elsewhere_and_break_no_policy(grid: Grid, context: Any) -> None:
    """Every request of the dashboard and of /docs, /redoc goes to this server; the CSP reports no violation."""
    page = context.new_page()
    requests: list[str] = []
    blocked: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    csp = ("csp", "net::ERR_BLOCKED_BY_CSP")  # how Playwright names a request the page's policy stopped
    page.on("requestfailed", lambda r: blocked.append(r.url) if r.failure in csp else None)
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    log_in(page, grid.url, "alice")
    page.wait_for_selector("#chart-status .uplot")
    for path in ("/ui/works", "/ui/bags", "/ui/hosts", "/ui/tunnels"):
        page.goto(grid.url + path)
        page.wait_for_selector("main .card")
    page.goto(grid.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "xwhep" in page.locator(".swagger-ui .info .title").inner_text()
    page.goto(grid.url + "/redoc")
    page.wait_for_selector("redoc h1", timeout=30_000)
    origin = urlsplit(grid.url).netloc

    def foreign() -> set[str]:
        return {u for u in requests if urlsplit(u).scheme in ("http", "https") and urlsplit(u).netloc != origin}

    deadline = time.monotonic() + 10
    while not foreign() <= set(blocked) and time.monotonic() < deadline:
        page.wait_for_timeout(100)  # the browser's events are delivered while waiting
    # ReDoc's bundle asks for its own logo from its CDN: the policy stops it before it leaves the browser
    assert foreign() <= set(blocked), foreign()
    assert all("redoc" in u for u in foreign()), foreign()
    violations = [p for p in problems if ("Content Security Policy" in p or "Refused" in p) and "redoc" not in p]
    assert not violations, violations
    assert not [p for p in problems if "Error" in p and "Failed to load resource" not in p], problems


def test_docs_pages_reference_no_other_host(grid: Grid) -> None:
    import ssl

    import httpx

    with httpx.Client(verify=ssl.create_default_context(cafile=str(grid.server.ca)), base_url=grid.url) as http:
        for path in ("/docs", "/redoc", "/ui/", "/ui/works/x"):
            r = http.get(path)
            assert r.status_code == 200, path
            assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text, path
            assert "script-src 'self';" in r.headers["content-security-policy"], path
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
            assert "'unsafe-inline'" not in r.headers["content-security-policy"].split("script-src")[1].split(";")[0]
            assert r.headers["x-content-type-options"] == "nosniff"
        assert http.get("/", follow_redirects=False).headers["location"] == "/ui/"
        assert http.get("/ui/js/main.js").headers["cache-control"] == "no-cache"
        vendor = http.get("/ui/vendor/uplot-1.6.32/uPlot.iife.min.js")
        assert "immutable" in vendor.headers["cache-control"]
        assert http.get("/ui/js/main.js", headers={"If-None-Match": vendor.headers["etag"]}).status_code == 200
        etag = http.get("/ui/js/main.js").headers["etag"]
        assert http.get("/ui/js/main.js", headers={"If-None-Match": etag}).status_code == 304
        assert http.get("/ui/js/nothing.js").status_code == 404
        assert http.get("/ui/../pyproject.toml").status_code == 404


def test_session_end_returns_to_the_login_page(grid: Grid, context: Any) -> None:
    """A token the server stops accepting (the user ended its sessions) brings the login page with the reason."""
    page = context.new_page()
    log_in(page, grid.url, "bob", path="/ui/works")
    page.wait_for_selector("#works-count")
    me = grid.bob.me()
    time.sleep(0.01)  # the revocation compares issue times in ms: be past the token's
    grid.bob.revoke_tokens(me["uid"])
    page.locator(".form-note").wait_for(timeout=30_000)  # the next live refresh is refused
    assert "session ended" in page.locator(".form-note").inner_text()
    assert page.evaluate("sessionStorage.getItem('xwhep.session')") is None
