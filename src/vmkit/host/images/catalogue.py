"""The images vmkit offers, by name: the ones it builds (``vmkit image build``) and the official cloud
images it downloads (``vmkit image pull``). Nothing but names and addresses, so ``--help`` can list
them without loading the builders."""

from __future__ import annotations

from dataclasses import dataclass

MICRO = "micro"
"""The micro guest: a small kernel and a busybox initramfs (:mod:`vmkit.host.images.micro`)."""
MICRO_FULL = "micro-full"
"""The micro guest on Debian's generic kernel (USB storage, 9p)."""
DEBIAN_12 = "debian-12"
"""Debian 12 built by vmkit from Debian packages (:mod:`vmkit.host.images.debian`)."""

DEBIAN_12_DOCKER = "debian-12-docker"
DEBIAN_12_DEV = "debian-12-dev"
DERIVED: dict[str, tuple[str, ...]] = {
    # the docker template's: the engine from Debian's packages (no registry is needed to build it);
    # apparmor is only Recommended by docker.io, but without it no container starts (the kernel has
    # AppArmor on, and the engine then needs apparmor_parser to load its profile)
    DEBIAN_12_DOCKER: ("docker.io", "apparmor"),
    # the dev template's: a C tool chain, git, and what most builds reach for
    DEBIAN_12_DEV: ("build-essential", "git", "pkg-config", "python3", "curl", "less"),
}
"""Images built like ``debian-12`` (same recipe) with these Debian packages added, by name."""

BUILDABLE: tuple[str, ...] = (MICRO, MICRO_FULL, DEBIAN_12, *DERIVED)
"""What ``vmkit image build`` builds."""


@dataclass(frozen=True)
class CatalogueEntry:
    """An official cloud image: where it is and where its publisher's checksums are."""

    name: str  # what the user types: vmkit image pull NAME
    image_name: str  # the name in the store
    base_url: str  # directory holding the image and the checksum file
    filename: str
    sums_filename: str
    description: str

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.filename}"

    @property
    def sums_url(self) -> str:
        return f"{self.base_url}/{self.sums_filename}"


CATALOGUE: dict[str, CatalogueEntry] = {
    "ubuntu-24.04": CatalogueEntry(
        name="ubuntu-24.04",
        image_name="ubuntu-24.04",
        base_url="https://cloud-images.ubuntu.com/releases/24.04/release",
        filename="ubuntu-24.04-server-cloudimg-amd64.img",
        sums_filename="SHA256SUMS",
        description="Ubuntu 24.04 LTS (Noble) server cloud image, amd64, qcow2",
    ),
    # Stored as debian-12-cloud: "debian-12" is the image vmkit builds itself.
    "debian-12": CatalogueEntry(
        name="debian-12",
        image_name="debian-12-cloud",
        base_url="https://cloud.debian.org/images/cloud/bookworm/latest",
        filename="debian-12-genericcloud-amd64.qcow2",
        sums_filename="SHA512SUMS",  # Debian publishes SHA512SUMS (no SHA256SUMS)
        description="Debian 12 (bookworm) genericcloud image, amd64, qcow2",
    ),
}
