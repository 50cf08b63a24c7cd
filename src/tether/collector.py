"""The cycle collector in a long-lived process that holds thousands of open requests."""

from __future__ import annotations

import gc

#: Second-generation collections between two full ones (Python's default is 10).
FULL_COLLECTION_EVERY = 1000


def settle_garbage_collector() -> None:
    """Keep full collections from stopping the process for long, once it has started up.

    Everything alive now - millions of objects in an Airflow API server - is frozen
    out of every later collection: scanned in full, it stopped the event loop for
    0.3-0.6 s every ~10 s under a thousand agents. Each request held open (a lease
    long-poll) then keeps some 350 objects alive - the coroutines, events and
    contexts of every middleware layer - which live long enough to reach the
    oldest generation: with a thousand agents a third of a million objects, scanned
    in 0.3 s at every full collection, one every few seconds. Reference counting,
    not the cycle collector, frees them when the request ends, and a full
    collection finds a few hundred objects in cycles: running one every thousand
    second-generation collections instead of every ten leaves that little garbage
    a while longer and removes the stalls.
    """
    gc.freeze()
    first, second, third = gc.get_threshold()
    gc.set_threshold(first, second, max(third, FULL_COLLECTION_EVERY))
