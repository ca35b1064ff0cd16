"""lstmkit.env reads what os.environ holds at the moment of the call."""

from __future__ import annotations

import os

import pytest

from lstmkit import env


def test_read_follows_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "LSTMKIT_TEST_VARIABLE"
    monkeypatch.delenv(name, raising=False)
    assert env.read(name) == ""
    monkeypatch.setenv(name, "  avx2 ")
    assert env.read(name) == "avx2"
    os.environ[name] = "généric"
    assert env.read(name) == "généric"
    monkeypatch.delenv(name)
    assert env.read(name) == ""
