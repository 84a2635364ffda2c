"""Producers of sample traffic and subscriptions: `python -m sources <source> [options]`."""
