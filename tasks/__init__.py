"""Shared logic and IO plumbing: called by flows/ (batch) and stream_workers/ (realtime)."""
