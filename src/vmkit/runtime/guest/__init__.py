"""Talking to the guest: qemu-guest-agent (one shared channel), commands and files."""
