"""vmkit: create, run and manage Linux virtual machines on Linux hosts, on top of QEMU."""

__version__ = "0.1.0"
