from __future__ import annotations

import pytest

from lstmkit import backends


@pytest.fixture(params=backends.PREFERENCE)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test using this fixture runs once per backend, forced through LSTMKIT_BACKEND."""
    monkeypatch.setenv(backends.BACKEND_ENV, request.param)
    return request.param
