"""Talking to a running guest: SSH keys and pinned host keys (and later the agent client)."""
