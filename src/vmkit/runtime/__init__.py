"""One QEMU, in-process and async: the machine, its devices, shares, console and the guest agent.

The lowest layer above the configuration: it imports nothing of host, state, api or the daemon.
"""
