"""The several-hosts tests skip, saying why, where hosts cannot be built."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.integration import netns


def test_without_root_the_hosts_test_skips_naming_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="need root"):
        netns.require_namespaces()


def test_without_iproute2_the_hosts_test_skips_naming_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="iproute2"):
        netns.require_namespaces()


def test_without_postgres_binaries_the_hosts_test_skips_naming_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(netns, "postgres_bin", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL server binaries"):
        netns.require_namespaces()
