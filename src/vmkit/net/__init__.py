"""Virtual networks: definitions in the vmkit home, bridges, taps, dnsmasq, nftables, the rootless switch.

``definition`` (names, addresses: pure), ``render`` (dnsmasq config and nftables ruleset: pure,
golden-tested), ``system`` (the host side: ``ip``, ``nft``, dnsmasq, taps), ``store`` (networks in
``$VMKIT_HOME/networks``, members, bringing networks up and down, a machine's NICs), ``forward``
(userspace port forwards to a machine's address), ``switch`` (the rootless network's switch process).
"""
