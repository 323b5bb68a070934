"""The two container images every component names, and how a compiled pipeline is pointed at another registry.

Components are compiled with the images `make images` tags by default (ghcr.io/example/sidflow-{runtime,trainer}); a
platform team pushes them to its own registry and compiles the IR against it (`sidflow pipeline compile
--image-registry REG [--runtime-digest sha256:… --trainer-digest sha256:…]`). The rewrite is textual on the compiled
IR, so every place an image appears (executor images, the TrainJob's trainer_image input) changes and nothing else.
"""

import re

from sidflow import __version__

DEFAULT_REGISTRY = "ghcr.io/example"
RUNTIME = f"{DEFAULT_REGISTRY}/sidflow-runtime:{__version__}"  # CPU: this package + kfp (containers/runtime)
TRAINER = f"{DEFAULT_REGISTRY}/sidflow-trainer:{__version__}"  # CUDA: training and evaluation (containers/trainer)
_REGISTRY = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def retarget(text: str, registry: str | None = None, runtime_digest: str | None = None,
             trainer_digest: str | None = None) -> str:
    """Return compiled IR text with sidflow's images under `registry` (and pinned by digest when one is given)."""
    if registry is not None and not _REGISTRY.match(registry):
        raise ValueError(f"image registry {registry!r} is not a registry path like registry.example.com/ml")
    for name, digest in (("runtime", runtime_digest), ("trainer", trainer_digest)):
        if digest is not None and not _DIGEST.match(digest):
            raise ValueError(f"{name} digest {digest!r} is not sha256:<64 hex>")
    out = text
    for image, digest in ((RUNTIME, runtime_digest), (TRAINER, trainer_digest)):
        repo = image.rsplit(":", 1)[0].replace(DEFAULT_REGISTRY, registry or DEFAULT_REGISTRY, 1)
        out = out.replace(image, f"{repo}@{digest}" if digest else f"{repo}:{__version__}")
    return out
