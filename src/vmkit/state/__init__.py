"""Saved machine state: the encrypted file format, the per-user key, save, restore and snapshots."""
