"""The browser image's DevTools proxy: Chromium's loopback URLs become the instance's public ones."""

from __future__ import annotations

import json

import pytest

from gateway.guest.browser import chromium_argv, devtools_port, public_urls

VERSION = {
    "Browser": "Chrome/156.0.8078.79",
    "webSocketDebuggerUrl": "ws://127.0.0.1:41234/devtools/browser/abc",
}
PAGE = {
    "devtoolsFrontendUrl": "/devtools/inspector.html?ws=127.0.0.1:41234/devtools/page/P1",
    "webSocketDebuggerUrl": "ws://127.0.0.1:41234/devtools/page/P1",
}
HOST = "instance-1c0c6b4e-2b1f-4a55-9d44-7d8f0f4b1e10.browser.example.com"


def rewritten(doc: dict, host: str, secure: bool) -> dict:
    return json.loads(public_urls(json.dumps(doc).encode(), "127.0.0.1:41234", host, secure))


@pytest.mark.parametrize(("secure", "scheme", "param"), [(False, "ws", "ws"), (True, "wss", "wss")])
def test_urls_name_the_public_host_and_scheme(secure: bool, scheme: str, param: str) -> None:
    version = rewritten(VERSION, HOST, secure)
    assert version["webSocketDebuggerUrl"] == f"{scheme}://{HOST}/devtools/browser/abc"
    assert version["Browser"] == VERSION["Browser"]
    page = rewritten(PAGE, HOST + ":8443", secure)
    assert page["devtoolsFrontendUrl"] == f"/devtools/inspector.html?{param}={HOST}:8443/devtools/page/P1"
    assert page["webSocketDebuggerUrl"] == f"{scheme}://{HOST}:8443/devtools/page/P1"


def test_chromium_runs_headless_on_loopback_with_its_own_profile(tmp_path) -> None:
    argv = chromium_argv("/usr/bin/chromium", tmp_path / "profile")
    assert "--headless" in argv and "--remote-debugging-address=127.0.0.1" in argv
    assert f"--user-data-dir={tmp_path / 'profile'}" in argv
    assert argv[-1] == "about:blank"


@pytest.mark.parametrize(
    ("text", "port"),
    [
        ("41234\n/devtools/browser/abc", 41234),
        ("41234\n", 41234),
        ("", None),  # created, not yet written (CI saw this: an IndexError killed the instance's start)
        ("412", None),  # cut inside the port: the newline has not been written yet
        ("41234", None),
        ("0\n/devtools/browser/abc", None),
        ("70000\n/devtools/browser/abc", None),
        ("-1\n/devtools/browser/abc", None),
        ("\u0664\u0661\n/x", None),  # non-ASCII digits
    ],
)
def test_the_devtools_port_is_read_only_once_its_line_is_whole(text: str, port: int | None) -> None:
    assert devtools_port(text) == port
