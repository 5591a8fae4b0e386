"""PostgreSQL fixtures; the main conftest imports them so any test can ask for them by name."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.postgres import TempDatabase, ThrowawayPostgres


@pytest.fixture
def pg_database() -> Iterator[TempDatabase]:
    """A private, empty database on the shared server, dropped after the test."""
    with TempDatabase() as db:
        yield db


@pytest.fixture
def throwaway_pg() -> Iterator[ThrowawayPostgres]:
    """A cluster of the test's own, for stopping and crashing; destroyed after the test."""
    with ThrowawayPostgres.start() as cluster:
        yield cluster
