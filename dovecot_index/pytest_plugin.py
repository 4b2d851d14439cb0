"""pytest plugin: fixtures that give a test a throwaway real Dovecot.

Registered through the ``pytest11`` entry point ``dovecot_index``, so it is active in
any project that has ``dovecot-index`` installed. Importing it never needs Dovecot;
tests that use the fixtures (or carry the ``live`` marker) are *skipped* with an install
hint when Dovecot is absent.

Fixtures:

``live_dovecot``
    A function-scoped :class:`~dovecot_index.live.LiveDovecot` with the sdbox backend
    and stock index settings, closed after the test.

``live_dovecot_factory``
    A callable ``factory(backend="sdbox", force_index_write=False, settings=None,
    **kwargs)`` returning new :class:`~dovecot_index.live.LiveDovecot` instances; all of
    them are closed at teardown.

Tests using either fixture get the ``live`` marker automatically, so
``pytest -m "not live"`` deselects them. ``pytest --dovecot-keep`` keeps the
temporary Dovecot directories for inspection (their paths are printed at teardown).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .live import LiveDovecot

_LIVE_FIXTURES = ("live_dovecot", "live_dovecot_factory")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dovecot_index")
    group.addoption("--dovecot-keep", action="store_true", default=False,
                    help="keep the temporary directories of live Dovecot fixtures")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "live: needs a real Dovecot (skipped with a reason when it is absent)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        if any(name in names for name in _LIVE_FIXTURES):
            item.add_marker(pytest.mark.live)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("live") is not None:
        _skip_without_dovecot()


def _skip_without_dovecot() -> None:
    from .live import missing_reason

    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def live_dovecot_factory(request: pytest.FixtureRequest) -> Iterator[
        Callable[..., LiveDovecot]]:
    """Factory for :class:`~dovecot_index.live.LiveDovecot` instances (closed at teardown)."""
    _skip_without_dovecot()
    from .live import LiveDovecot

    keep = bool(request.config.getoption("dovecot_keep", default=False))
    created: list[LiveDovecot] = []

    def factory(backend: str = "sdbox", force_index_write: bool = False,
                settings: Mapping[str, str] | None = None, **kwargs: Any) -> LiveDovecot:
        kwargs.setdefault("keep", keep)
        dovecot = LiveDovecot(backend=backend,  # type: ignore[arg-type]
                              force_index_write=force_index_write, settings=settings,
                              **kwargs)
        created.append(dovecot)
        return dovecot

    yield factory
    for dovecot in reversed(created):
        dovecot.close()
        if dovecot.keep:
            print(f"\nkept live Dovecot directory: {dovecot.root}")


@pytest.fixture
def live_dovecot(live_dovecot_factory: Callable[..., LiveDovecot]) -> LiveDovecot:
    """A throwaway real Dovecot (sdbox backend, stock index settings)."""
    return live_dovecot_factory()
