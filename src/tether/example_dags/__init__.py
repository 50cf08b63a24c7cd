"""Example DAGs shipped with Tether (used by the quick start and the tests)."""
