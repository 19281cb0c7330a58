"""Driving QEMU: which accelerator, what command line, the QMP monitor."""
