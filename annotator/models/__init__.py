"""Models: open_clip loading, feature extraction up to the projections, prompts and the demo model."""

from annotator.models.encode import EncodeFailure, EncodeStats, encode_images
from annotator.models.loading import (
    ModelCheck,
    check_model,
    create_untrained_model,
    load_model,
    resolve_device,
    resolve_precision,
)
from annotator.models.prompts import DEFAULT_TEMPLATES, class_text_features, fill_templates
from annotator.models.specs import ModelKind, ModelSpec, supported_architectures
from annotator.models.towers import ImageFeatures, VisionLanguageModel

__all__ = [
    "DEFAULT_TEMPLATES",
    "EncodeFailure",
    "EncodeStats",
    "ImageFeatures",
    "ModelCheck",
    "ModelKind",
    "ModelSpec",
    "VisionLanguageModel",
    "check_model",
    "class_text_features",
    "create_untrained_model",
    "encode_images",
    "fill_templates",
    "load_model",
    "resolve_device",
    "resolve_precision",
    "supported_architectures",
]
