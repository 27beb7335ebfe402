"""The web view's settings, and its guard (basic auth, CSRF) before any page reads a store."""

from __future__ import annotations

import base64

import pytest
from click.testing import CliRunner

from app.cli import main
from app.settings import ConfigError
from app.web import WebSettings, create_app, web_settings


def auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_defaults_and_a_password_is_required() -> None:
    assert web_settings({"WEB_PASSWORD": "pw"}) == WebSettings("127.0.0.1", 5556, "admin", "pw")
    assert web_settings(
        {"WEB_PASSWORD": "pw", "WEB_HOST": "0.0.0.0", "WEB_PORT": "8000", "WEB_USERNAME": "ops"}
    ) == WebSettings("0.0.0.0", 8000, "ops", "pw")
    with pytest.raises(ConfigError, match="WEB_PASSWORD"):
        web_settings({})
    with pytest.raises(ConfigError, match="WEB_PORT"):
        web_settings({"WEB_PASSWORD": "pw", "WEB_PORT": "http"})


def test_the_command_refuses_to_start_without_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_PASSWORD", raising=False)
    result = CliRunner().invoke(main, ["web"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "configuration error: WEB_PASSWORD: expected a password for the web view "
        "(it never runs without one)"
    ]


def test_every_request_needs_the_credentials_and_every_post_the_csrf_token() -> None:
    web = create_app(WebSettings("127.0.0.1", 0, "admin", "pw"), secret=b"k" * 32).test_client()
    for path in ("/", "/dead", "/static/app.js"):
        assert web.get(path).status_code == 401
        assert web.get(path, headers=auth("admin", "wrong")).status_code == 401
        assert web.get(path, headers=auth("root", "pw")).status_code == 401
    assert "Basic" in web.get("/").headers["WWW-Authenticate"]
    assert web.post("/queues/low/pause", headers=auth("admin", "pw")).status_code == 403
    forged = {"csrf_token": "0" * 64}
    assert web.post("/dead/discard", data=forged, headers=auth("admin", "pw")).status_code == 403
    static = web.get("/static/app.js", headers=auth("admin", "pw"))
    assert static.status_code == 200
    assert "script-src 'self'" in static.headers["Content-Security-Policy"]
