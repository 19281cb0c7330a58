"""``vmkit image warm``: make a warm template of an image (see :mod:`vmkit.state.template`).

The template's machine is not an instance: it has no name in ``vmkit list`` and no supervisor. This
process runs its QEMU itself (in a staging directory beside the templates), for the few tens of
seconds of one boot, and ends it whatever happens (an interrupt included).
"""

from __future__ import annotations

from collections.abc import Callable

from vmkit.api import models
from vmkit.errors import ConfigError
from vmkit.host.builder import CreateOptions, config_from_options
from vmkit.host.images.store import ImageStore
from vmkit.state import template


def warm(image: str, *, memory: str | None = None, cpus: int | None = None,
         progress: Callable[[str], None] | None = None, rebuild: bool = False) -> tuple[models.WarmTemplate, bool]:
    """The current warm template of ``image`` for this memory and vCPU count, made now unless one exists
    (``rebuild``: make a new one anyway). Returns it and whether it was made now. Its layout is what
    ``vmkit create NAME --image IMAGE [--memory] [--cpus]`` gives a machine, so such machines fit it."""
    store = ImageStore()
    img = store.get(image)
    if img.kernel is None:
        raise ConfigError.single("IMAGE", f"image {image!r} has no kernel for direct boot")
    base = config_from_options(CreateOptions(name=template.TEMPLATE_NAME, image=image, memory=memory, cpus=cpus),
                               store)
    if not rebuild and (tpl := template.find(image, base.memory, base.cpus, store=store)) is not None:
        return models.WarmTemplate.model_validate(template.describe(tpl)), False
    tpl = template.build(img, base, progress=progress)
    return models.WarmTemplate.model_validate(template.describe(tpl)), True
