"""The API server's cycle collector after start-up: what exists is frozen, full collections are rare."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tether.collector import FULL_COLLECTION_EVERY, settle_garbage_collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_start_up_objects_are_frozen_and_full_collections_rare() -> None:
    gc.set_threshold(700, 10, 10)
    survivor = [object() for _ in range(100)]
    settle_garbage_collector()
    assert gc.get_freeze_count() >= len(survivor)
    assert gc.get_threshold() == (700, 10, FULL_COLLECTION_EVERY)


@pytest.mark.usefixtures("restored_collector")
def test_a_rarer_setting_already_made_is_kept() -> None:
    gc.set_threshold(1000, 20, 5000)
    settle_garbage_collector()
    assert gc.get_threshold() == (1000, 20, 5000)
