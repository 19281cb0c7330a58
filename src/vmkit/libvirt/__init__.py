"""libvirt: a vmkit machine as a libvirt domain.

``domain`` (the domain XML of a :class:`~vmkit.config.MachineConfig`: pure, golden-tested, every
vm.yaml setting mapped to an element or refused by name; the vm.yaml itself kept in the domain's
metadata and read back by :func:`~vmkit.libvirt.domain.config_from_domain_xml`).
"""
