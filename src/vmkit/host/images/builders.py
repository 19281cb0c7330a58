"""``vmkit image build NAME``: which builder makes each buildable image (:data:`catalogue.BUILDABLE`),
with one progress shape for all of them (lines of text)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from vmkit.errors import ConfigError
from vmkit.host.images import catalogue

if TYPE_CHECKING:
    from vmkit.host.images.debian import BuildProgress
    from vmkit.host.images.store import Image, ImageStore

Progress = Callable[[str], None]


class Builder(Protocol):
    def __call__(self, store: ImageStore, *, force: bool, progress: Progress | None, arch: str) -> Image: ...


def _lines(progress: Progress | None) -> Callable[[BuildProgress], None] | None:
    """A Debian builder's progress steps as lines (``[  12 s] stage: message``)."""
    if progress is None:
        return None

    def show(p: BuildProgress) -> None:
        progress(f"[{p.elapsed:5.0f} s] {p.stage}: {p.message}")

    return show


def _micro(store: ImageStore, *, force: bool, progress: Progress | None, arch: str) -> Image:
    from vmkit.host.images import micro

    return micro.build_micro(store, force=force, progress=progress, arch=arch)


def _micro_full(store: ImageStore, *, force: bool, progress: Progress | None, arch: str) -> Image:
    from vmkit.host.images import micro

    if arch != "x86_64":
        raise ConfigError.single("--arch", f"micro-full is built for x86_64 only: use micro --arch {arch}")
    return micro.build_micro_full(store, force=force, progress=progress)


def _debian(store: ImageStore, *, force: bool, progress: Progress | None, arch: str) -> Image:
    from vmkit.host.images import debian

    return debian.build_debian(store, force=force, progress=_lines(progress), arch=arch)


def _derived(name: str) -> Builder:
    def build(store: ImageStore, *, force: bool, progress: Progress | None, arch: str) -> Image:
        from vmkit.host.images import debian

        if arch != "x86_64":
            raise ConfigError.single("--arch", f"{name} is built for x86_64 only: use debian-12 --arch {arch}")
        return debian.build_debian(store, name=name, extra_packages=catalogue.DERIVED[name], force=force,
                                   progress=_lines(progress))

    return build


BUILDERS: dict[str, Builder] = {catalogue.MICRO: _micro, catalogue.MICRO_FULL: _micro_full,
                                catalogue.DEBIAN_12: _debian, **{n: _derived(n) for n in catalogue.DERIVED}}


def build(store: ImageStore, name: str, *, force: bool = False, progress: Progress | None = None,
          arch: str = "x86_64") -> Image:
    """Build image ``name`` (one of :data:`catalogue.BUILDABLE`) into ``store``, or return it if it is
    there (``force``: build it again)."""
    builder = BUILDERS.get(name)
    if builder is None:
        raise ConfigError.single("NAME", f"no builder for {name!r}: choose one of {', '.join(catalogue.BUILDABLE)}")
    return builder(store, force=force, progress=progress, arch=arch)
