"""Model specs: which open_clip model to load, written as one string.

A spec is one of

- ``ARCH:TAG``: an open_clip architecture with one of its pretrained tags,
  e.g. ``ViT-B-32:laion2b_s34b_b79k``;
- ``hf-hub:ORG/NAME``: an open_clip model on the Hugging Face Hub, config and weights;
- a local checkpoint file, with the architecture given separately (``--arch ARCH``);
- ``demo``: the small CLIP that annotator trains itself on handwritten digits.

Parsing validates the architecture and tag against open_clip's registry, so a typo fails
here with the valid choices listed instead of later inside open_clip.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import open_clip
from open_clip.pretrained import list_pretrained_tags_by_model

from annotator.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
DEMO_SPEC = "demo"

ArchitectureFamily = Literal["clip-vit", "siglip"]
"""Model families whose features annotator can extract up to the projections:
``clip-vit`` (open_clip ``VisionTransformer`` image tower with a ``proj`` matrix) and
``siglip`` (timm ViT whose attention-pool MLP ends the image tower)."""

_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_FOLDER_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


class ModelKind(StrEnum):
    """Source of a model's weights."""

    PRETRAINED = "pretrained"
    """An open_clip architecture with a pretrained tag, ``ARCH:TAG``."""
    HF_HUB = "hf-hub"
    """An open_clip model on the Hugging Face Hub, ``hf-hub:ORG/NAME``."""
    CHECKPOINT = "checkpoint"
    """A local weights file for a named open_clip architecture."""
    DEMO = "demo"
    """The demo CLIP trained by ``annotator demo``."""


def architecture_family(config: dict[str, Any]) -> ArchitectureFamily | None:
    """Classify an open_clip model config by the towers annotator supports.

    Parameters
    ----------
    config
        An open_clip model config: ``{"embed_dim", "vision_cfg", "text_cfg", ...}``.

    Returns
    -------
    str or None
        ``"clip-vit"``, ``"siglip"``, or None for towers whose last layer before the
        embedding is not a plain linear projection (ResNet, CoCa, Hugging Face text
        towers, timm towers with other pooling or an extra head, text without projection).
    """
    vision = config.get("vision_cfg", {})
    text = config.get("text_cfg", {})
    if "multimodal_cfg" in config:
        return None
    if text.get("hf_model_name") or text.get("embed_cls") or text.get("proj_type") == "none":
        return None
    if vision.get("timm_model_name"):
        if vision.get("timm_pool") == "map" and vision.get("timm_proj") == "none":
            return "siglip"
        return None
    if isinstance(vision.get("layers"), list | tuple) or vision.get("attentional_pool"):
        return None
    return "clip-vit"


@lru_cache(maxsize=1)
def supported_architectures() -> tuple[str, ...]:
    """Return open_clip's built-in architectures whose features annotator can extract."""
    names = []
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name)
        if config is not None and architecture_family(config) is not None:
            names.append(name)
    return tuple(names)


def check_architecture(arch: str) -> str:
    """Return the canonical architecture name, or raise ConfigError listing the valid ones."""
    name = arch.strip().replace("/", "-")
    supported = supported_architectures()
    if name in supported:
        return name
    listing = ", ".join(supported)
    if name in open_clip.list_models():
        raise ConfigError(
            f"open_clip architecture {arch!r} is not supported: its towers do not end in a "
            f"linear projection that annotator can make Bayesian (ResNet, CoCa and Hugging Face "
            f"text towers are not supported). Supported architectures: {listing}"
        )
    raise ConfigError(
        f"unknown open_clip architecture {arch!r}. Supported architectures: {listing}"
    )


def _check_tag(arch: str, tag: str) -> str:
    """Return the canonical pretrained tag, or raise ConfigError listing the tags of ``arch``."""
    # open_clip matches tags case-insensitively with '-' and '_' interchangeable.
    canonical = tag.strip().lower().replace("-", "_")
    tags = list_pretrained_tags_by_model(arch)
    if canonical in tags:
        return canonical
    if not tags:
        raise ConfigError(
            f"open_clip has no pretrained weights for {arch!r}, so {arch}:{tag} cannot be "
            f"loaded; pass a checkpoint file with `--model PATH --arch {arch}` instead"
        )
    raise ConfigError(
        f"unknown pretrained tag {tag!r} for {arch}. Tags open_clip has for {arch}: {', '.join(tags)}"
    )


def _path_exists(text: str) -> bool:
    try:
        return Path(os.path.expanduser(text)).exists()
    except (OSError, ValueError):  # a name too long or with a NUL byte is no existing file
        return False


def _looks_like_path(text: str) -> bool:
    return (
        os.sep in text
        or "/" in text
        or text.startswith((".", "~"))
        or text.lower().endswith(_CHECKPOINT_SUFFIXES)
        or _path_exists(text)
    )


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Return the SHA-256 of a file; memoised by path, size and modification time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    logger.debug("hashed %s (%d bytes) for its cache key", path, size)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """Return the SHA-256 hex digest of ``path``, computed once per size and mtime."""
    status = path.stat()
    return _file_digest(str(path), status.st_size, status.st_mtime_ns)


def folder_safe(text: str) -> str:
    """Replace characters that are unsafe in a folder name with ``_``."""
    return _FOLDER_UNSAFE.sub("_", text).strip("._") or "_"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. Build it with :meth:`parse`, which validates every field.

    ``ModelSpec.parse(str(spec), arch=spec.arch) == spec`` holds for every kind. A checkpoint
    needs ``arch`` beside its string, because ``str`` of a checkpoint spec is its path.
    """

    kind: ModelKind
    arch: str | None = None
    """open_clip architecture name, for ``pretrained`` and ``checkpoint``."""
    tag: str | None = None
    """Pretrained tag, canonical form (lower case, ``_`` for ``-``), for ``pretrained``."""
    hub_id: str | None = None
    """Hugging Face repository ``ORG/NAME``, for ``hf-hub``."""
    path: Path | None = None
    """Absolute path of the weights file, for ``checkpoint``."""

    def __post_init__(self) -> None:
        present = {
            "arch": self.arch is not None,
            "tag": self.tag is not None,
            "hub_id": self.hub_id is not None,
            "path": self.path is not None,
        }
        required = {
            ModelKind.PRETRAINED: {"arch", "tag"},
            ModelKind.HF_HUB: {"hub_id"},
            ModelKind.CHECKPOINT: {"arch", "path"},
            ModelKind.DEMO: set(),
        }[ModelKind(self.kind)]
        provided = {name for name, is_set in present.items() if is_set}
        if provided != required:
            raise ConfigError(
                f"a {ModelKind(self.kind).value} model spec needs exactly the fields "
                f"{sorted(required)}, got {sorted(provided)}; build specs with ModelSpec.parse"
            )

    @classmethod
    def parse(cls, text: str, arch: str | None = None) -> ModelSpec:
        """Parse ``ARCH:TAG``, ``hf-hub:ORG/NAME``, a checkpoint path (with ``arch``) or ``demo``.

        Parameters
        ----------
        text
            The spec as the user wrote it.
        arch
            open_clip architecture of a checkpoint file. Only a checkpoint takes it.

        Raises
        ------
        ConfigError
            For an unknown architecture (the supported ones are listed), an unknown tag (the
            architecture's tags are listed), a missing checkpoint file, a checkpoint without
            ``arch``, or ``arch`` given with a spec that carries its own architecture.
        """
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f"model spec {text!r} is empty; use ARCH:TAG, hf-hub:ORG/NAME, a checkpoint "
                "path with --arch, or demo"
            )
        text = text.strip()
        if arch is not None and not arch.strip():
            arch = None

        if text == DEMO_SPEC:
            if arch is not None:
                raise ConfigError(f"the demo model has its own architecture; drop --arch {arch}")
            return cls(kind=ModelKind.DEMO)

        if text.startswith(HF_HUB_PREFIX):
            hub_id = text[len(HF_HUB_PREFIX) :].strip()
            if not _HUB_ID_PATTERN.match(hub_id):
                raise ConfigError(
                    f"invalid Hugging Face model id {hub_id!r} in {text!r}; write it as "
                    "hf-hub:ORG/NAME, e.g. hf-hub:timm/ViT-B-16-SigLIP"
                )
            if arch is not None:
                raise ConfigError(f"{text} carries its own open_clip config; drop --arch {arch}")
            return cls(kind=ModelKind.HF_HUB, hub_id=hub_id)

        if arch is not None:
            return cls._parse_checkpoint(text, arch)

        head, separator, tail = text.rpartition(":")
        if separator and head.replace("/", "-") in open_clip.list_models():
            name = check_architecture(head)
            return cls(kind=ModelKind.PRETRAINED, arch=name, tag=_check_tag(name, tail))

        if _looks_like_path(text):
            path = cls._check_checkpoint_path(text)
            raise ConfigError(
                f"checkpoint {path} needs its open_clip architecture: pass --arch ARCH "
                f"(e.g. --arch ViT-B-32); supported architectures: {', '.join(supported_architectures())}"
            )

        name = check_architecture(head if separator else text)
        tags = list_pretrained_tags_by_model(name)
        raise ConfigError(
            f"model spec {text!r} names no pretrained tag; write it as {name}:TAG with one of "
            f"the tags open_clip has for {name}: {', '.join(tags) or '(none)'}"
        )

    @classmethod
    def _parse_checkpoint(cls, text: str, arch: str) -> ModelSpec:
        path = cls._check_checkpoint_path(text)
        return cls(kind=ModelKind.CHECKPOINT, arch=check_architecture(arch), path=path)

    @staticmethod
    def _check_checkpoint_path(text: str) -> Path:
        try:
            path = Path(os.path.expanduser(text)).resolve()
            exists = path.exists()
        except (OSError, ValueError) as error:
            raise ConfigError(f"invalid checkpoint path {text!r}: {error}") from error
        if not exists:
            raise ConfigError(
                f"checkpoint file {path} not found; check the path, or use ARCH:TAG or "
                "hf-hub:ORG/NAME for a published model"
            )
        if not path.is_file():
            raise ConfigError(f"checkpoint {path} is a folder; pass the weights file inside it")
        return path

    def __str__(self) -> str:
        if self.kind == ModelKind.PRETRAINED:
            return f"{self.arch}:{self.tag}"
        if self.kind == ModelKind.HF_HUB:
            return f"{HF_HUB_PREFIX}{self.hub_id}"
        if self.kind == ModelKind.CHECKPOINT:
            return str(self.path)
        return DEMO_SPEC

    @property
    def cache_key(self) -> str:
        """Folder-safe identity of the weights, for feature caches.

        Published models are keyed by name. A checkpoint and the demo model are keyed by the
        SHA-256 of their weights file, so features computed with other weights are never
        reused. The file is hashed once per process until its size or modification time
        changes.

        Raises
        ------
        ModelLoadError
            If the checkpoint or the demo weights file is missing.
        """
        if self.kind == ModelKind.PRETRAINED:
            return folder_safe(f"{self.arch}--{self.tag}")
        if self.kind == ModelKind.HF_HUB:
            return folder_safe("hf-hub--" + str(self.hub_id).replace("/", "--"))
        if self.kind == ModelKind.CHECKPOINT:
            assert self.path is not None  # guaranteed by __post_init__
            if not self.path.is_file():
                raise ModelLoadError(f"checkpoint file {self.path} not found; check the path")
            return folder_safe(f"{self.arch}--checkpoint-{file_digest(self.path)[:16]}")
        from annotator.models import demo

        weights = demo.demo_model_dir() / "weights.pt"
        if not weights.is_file():
            raise ModelLoadError(
                f"the demo model's weights {weights} are missing; run `annotator demo` to train them"
            )
        return demo_cache_key(weights)


def demo_cache_key(weights: Path) -> str:
    """Return the cache key of the demo model whose weights file is ``weights``."""
    return folder_safe(f"demo--{file_digest(weights)[:16]}")
