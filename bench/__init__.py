"""Tether's benchmark suite: LocalExecutor, Tether and the Edge Executor side by side, and a scale test."""
