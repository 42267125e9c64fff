"""Shared fixtures: real brokers, unique topic prefixes, temp dirs."""

from __future__ import annotations

import uuid

import pytest

from tests.brokers import Broker, make_broker


@pytest.fixture(scope="session")
def shared_broker():
    """One real broker for the session; tests isolate by topic prefix."""
    b = make_broker()
    yield b
    b.stop()


@pytest.fixture
def broker(tmp_path):
    """A broker of this test's own, which the test may stop and restart."""
    b = Broker(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture
def prefix() -> str:
    """A unique topic prefix so tests sharing a broker never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    """An unpacked digits app (model, manifest, labels) built from real data."""
    from tests.models import build_digits_app_dir

    return build_digits_app_dir(tmp_path_factory.mktemp("digits"))
