"""Load open_clip models from specs, failing fast and clearly when weights are not available.

open_clip downloads missing weights through ``huggingface_hub``, which retries a failed
metadata request with growing timeouts (up to 60 s in huggingface_hub 2.4). Without a network,
that delays the error by most of a minute. Here the local Hugging Face cache is searched first,
offline mode (``HF_HUB_OFFLINE=1``) never touches the network, and a download starts only after
one metadata request has succeeded within ``NETWORK_TIMEOUT_S`` seconds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx2
import open_clip
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import (
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.model import CLIP, CustomTextCLIP, convert_weights_to_lp, set_model_preprocess_cfg
from open_clip.pretrained import get_pretrained_cfg
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from annotator.errors import ConfigError, ModelLoadError
from annotator.models.specs import (
    ModelKind,
    ModelSpec,
    architecture_family,
    check_architecture,
    demo_cache_key,
)
from annotator.models.towers import VisionLanguageModel, describe

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")

NETWORK_TIMEOUT_S = 3.0
"""Timeout in seconds of the metadata request that precedes every download from the hub."""

_T = TypeVar("_T")

# Connection failures surface as OSError subclasses, httpx2 transport errors (the HTTP client
# of huggingface_hub 2.x) or TimeoutError from _run_with_timeout.
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, httpx2.HTTPError)


@dataclass(frozen=True)
class ModelCheck:
    """Result of :func:`check_model`: whether the spec loads here, and what was found."""

    ok: bool
    message: str


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device``, or CUDA when available and the CPU otherwise for None or ``"auto"``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"invalid device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use cpu or auto")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``precision`` to ``fp32``, ``fp16`` or ``bf16`` for ``device``.

    ``auto`` is bf16 on CUDA devices that support it, fp16 on other CUDA devices, and fp32 on
    the CPU. Half precision is rejected on the CPU, where it is slow or unsupported.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"invalid precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            raise ConfigError(
                f"precision {precision!r} needs a CUDA device, but the model runs on {device}; "
                "use precision 'auto' or 'fp32'"
            )
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Return whether Hugging Face offline mode is on, reading the environment at call time."""
    return (
        _is_true(os.environ.get("HF_HUB_OFFLINE"))
        or _is_true(os.environ.get("TRANSFORMERS_OFFLINE"))
        or hub_constants.HF_HUB_OFFLINE
    )


def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Return the Hugging Face hub cache folder: ``cache_dir``, ``$HF_HUB_CACHE`` or ``$HF_HOME/hub``.

    The environment is read at call time, not when huggingface_hub was imported.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hub_constants.HF_HUB_CACHE)


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT


def _run_with_timeout(function: Callable[[], _T], timeout: float) -> _T:
    """Run ``function`` in a daemon thread and return its result within ``timeout`` seconds.

    A daemon thread bounds even a DNS lookup, which socket timeouts do not cover. On timeout
    the thread is abandoned and TimeoutError is raised.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # re-raised in the caller's thread below
            outcome["error"] = error

    worker = threading.Thread(target=target, name="annotator-hub-check", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"timed out after {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# 1. Where weights come from


@dataclass(frozen=True)
class _HubFiles:
    """A Hugging Face repository and the acceptable names of its weights file, preferred first."""

    repo_id: str
    weights: tuple[str, ...]


def _safe_alternatives(filename: str) -> tuple[str, ...]:
    """Return ``filename`` preceded by its safetensors twin, which open_clip prefers."""
    if filename == HF_WEIGHTS_NAME:
        return (HF_SAFE_WEIGHTS_NAME, filename)
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors", filename)
    return (filename,)


def _hub_files(spec: ModelSpec) -> _HubFiles:
    if spec.kind == ModelKind.HF_HUB:
        return _HubFiles(repo_id=str(spec.hub_id), weights=_safe_alternatives(HF_WEIGHTS_NAME))
    location = get_pretrained_cfg(str(spec.arch), str(spec.tag)).get("hf_hub", "")
    if not location:
        # NOTE: every tag of open_clip 3.3 has an hf_hub entry; URL-only tags are not handled.
        raise ModelLoadError(
            f"open_clip lists no Hugging Face repository for {spec}; download its weights and "
            f"pass them with `--model PATH --arch {spec.arch}`"
        )
    # open_clip writes "ORG/NAME/" for the default weights file and "ORG/NAME/FILE" otherwise.
    if location.endswith("/"):
        repo_id, filename = location.rstrip("/"), HF_WEIGHTS_NAME
    else:
        repo_id, filename = os.path.split(location)
    return _HubFiles(repo_id=repo_id, weights=_safe_alternatives(filename))


def _cached_file(repo_id: str, names: tuple[str, ...], cache: Path) -> Path | None:
    for name in names:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache)
        if isinstance(found, str):
            return Path(found)
    return None


def _unavailable(spec: ModelSpec, files: _HubFiles, cache: Path, reason: str) -> ModelLoadError:
    folder = cache / ("models--" + files.repo_id.replace("/", "--"))
    return ModelLoadError(
        f"weights for {spec} are not in the local Hugging Face cache ({folder}) and cannot be "
        f"downloaded: {reason}. Supply them in one of two ways: (1) download the checkpoint "
        f"({' or '.join(files.weights)} from https://huggingface.co/{files.repo_id}) and pass "
        f"it with `--model PATH --arch {spec.arch or 'ARCH'}`; or (2) on a machine with network "
        f"access, run `hf download {files.repo_id}` (huggingface_hub's command) with HF_HOME set "
        f"to an empty folder, copy that folder here and set HF_HOME to it (or HF_HUB_CACHE to "
        f"its hub/ subfolder), so the files are found in {folder}.{_download_hint()}"
    )


def _download_hint() -> str:
    if hub_offline():
        return " With network access, unset HF_HUB_OFFLINE to download automatically."
    return ""


def _request_hub_metadata(repo_id: str, filename: str, endpoint: str) -> None:
    """Request one file's metadata within ``NETWORK_TIMEOUT_S`` seconds, DNS lookup included."""
    url = hf_hub_url(repo_id, filename, endpoint=endpoint)
    _run_with_timeout(
        lambda: get_hf_file_metadata(url, timeout=NETWORK_TIMEOUT_S, endpoint=endpoint),
        NETWORK_TIMEOUT_S + 0.5,
    )


def _download(spec: ModelSpec, files: _HubFiles, names: tuple[str, ...], cache: Path) -> Path:
    """Download the first of ``names`` that the hub has, after a bounded metadata request."""
    endpoint = _hub_endpoint()
    chosen = None
    for name in names:
        try:
            _request_hub_metadata(files.repo_id, name, endpoint)
        except (EntryNotFoundError, RepositoryNotFoundError) as error:
            logger.info("the hub has no %s in %s: %s", name, files.repo_id, error)
            continue
        except _NETWORK_ERRORS as error:
            raise _unavailable(
                spec, files, cache, f"the Hugging Face Hub at {endpoint} did not respond ({error})"
            ) from error
        chosen = name
        break
    if chosen is None:
        raise ModelLoadError(
            f"the Hugging Face repository {files.repo_id} has none of {', '.join(names)}; "
            f"check the spec {spec}"
        )
    logger.info("downloading %s from %s into %s", chosen, files.repo_id, cache)
    try:
        path = hf_hub_download(
            files.repo_id,
            chosen,
            cache_dir=cache,
            endpoint=endpoint,
            etag_timeout=NETWORK_TIMEOUT_S,
        )
    except _NETWORK_ERRORS as error:
        raise _unavailable(spec, files, cache, f"the download failed ({error})") from error
    return Path(path)


def _resolve_hub_file(
    spec: ModelSpec, files: _HubFiles, names: tuple[str, ...], cache: Path, *, download: bool
) -> Path:
    found = _cached_file(files.repo_id, names, cache)
    if found is not None:
        logger.info("using cached %s for %s", found, spec)
        return found
    if hub_offline():
        raise _unavailable(spec, files, cache, "Hugging Face offline mode is on (HF_HUB_OFFLINE=1)")
    if not download:
        raise _unavailable(
            spec,
            files,
            cache,
            "this check reads only local files (ingest and simulate download missing weights "
            "when the Hugging Face hub is reachable)",
        )
    return _download(spec, files, names, cache)


def resolve_weights(
    spec: ModelSpec, *, cache_dir: str | Path | None = None, download: bool = True
) -> Path:
    """Return the local weights file of ``spec``, downloading it only when allowed and reachable.

    Parameters
    ----------
    spec
        Any model spec.
    cache_dir
        Hugging Face hub cache, or annotator's cache root for the demo; see :func:`load_model`.
    download
        When False, only local files are used.

    Raises
    ------
    ModelLoadError
        When the weights are neither local nor downloadable. The message explains how to
        supply them.
    """
    if spec.kind == ModelKind.CHECKPOINT:
        if spec.path is None or not spec.path.is_file():
            raise ModelLoadError(f"checkpoint file {spec.path} not found; check the path")
        return spec.path
    if spec.kind == ModelKind.DEMO:
        return _demo_weights(cache_dir)
    files = _hub_files(spec)
    return _resolve_hub_file(
        spec, files, files.weights, hub_cache_dir(cache_dir), download=download
    )


def _resolve_hub_config(spec: ModelSpec, cache: Path, *, download: bool) -> dict[str, Any]:
    files = _hub_files(spec)
    path = _resolve_hub_file(spec, files, (HF_CONFIG_NAME,), cache, download=download)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(
            f"cannot read the open_clip config {path} of {spec}: {error}"
        ) from error
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise ModelLoadError(
            f"{path} of {spec} has no 'model_cfg'; it is not an open_clip model repository"
        )
    return config


def _demo_weights(cache_dir: str | Path | None) -> Path:
    from annotator.models import demo

    weights = demo.demo_model_dir(Path(cache_dir) if cache_dir is not None else None) / "weights.pt"
    if not weights.is_file():
        raise ModelLoadError(
            f"the demo model's weights {weights} are missing; run `annotator demo` to train them"
        )
    return weights


# 2. Tokenizers


def build_tokenizer(
    model_config: dict[str, Any], *, cache_dir: str | Path | None = None, download: bool = True
) -> Callable[..., torch.Tensor]:
    """Build the open_clip tokenizer that ``model_config``'s text tower expects.

    Hugging Face tokenizers (SigLIP) need the ``transformers`` package and their files in the
    hub cache. They are looked up locally first, and downloaded only when ``download`` is set,
    offline mode is off and the hub responds within ``NETWORK_TIMEOUT_S``.

    Raises
    ------
    ModelLoadError
        If ``transformers`` is missing or the tokenizer files are unavailable.
    """
    text_config = model_config.get("text_cfg", {})
    context_length = int(text_config.get("context_length", 77))
    options = dict(text_config.get("tokenizer_kwargs", {}))
    name = text_config.get("hf_tokenizer_name")
    if not name:
        return SimpleTokenizer(context_length=context_length, **options)

    if importlib.util.find_spec("transformers") is None:
        raise ModelLoadError(
            f"the text tower uses the Hugging Face tokenizer {name!r}, which needs the "
            "`transformers` package; install it with `pip install transformers sentencepiece`"
        )
    cache = str(hub_cache_dir(cache_dir))
    missing = (
        f"the tokenizer {name!r} is not in the Hugging Face cache {cache}; on a machine with "
        f"network access run `hf download {name}` with HF_HOME set to the folder you copy here"
    )
    try:
        return HFTokenizer(
            name, context_length=context_length, cache_dir=cache, local_files_only=True, **options
        )
    except OSError as error:
        if hub_offline() or not download:
            raise ModelLoadError(f"{missing} ({error})") from error
    endpoint = _hub_endpoint()
    try:
        _request_hub_metadata(name, "tokenizer_config.json", endpoint)
    except _NETWORK_ERRORS as error:
        raise ModelLoadError(
            f"{missing}. The hub at {endpoint} did not respond ({error})"
        ) from error
    return HFTokenizer(name, context_length=context_length, cache_dir=cache, **options)


# 3. Models


def _convert_load_errors(spec: ModelSpec, weights: Path, function: Callable[[], _T]) -> _T:
    """Run open_clip's model creation and turn its failures into ModelLoadError.

    A truncated or foreign file makes ``torch.load`` and open_clip raise almost any exception
    type (IndexError, UnpicklingError, and AssertionError from open_clip's own shape checks
    among them), so every Exception is converted here, with the original chained as cause.
    """
    try:
        return function()
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"cannot load the weights {weights} for {spec}: {type(error).__name__}: {error}. "
            "Check that the file is an open_clip checkpoint of this architecture"
        ) from error


def _create_open_clip(
    spec: ModelSpec,
    weights: Path,
    device: torch.device,
    precision: str,
    cache: Path,
    *,
    download: bool,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Create the open_clip model of a pretrained, hub or checkpoint spec; return it and its config."""
    if spec.kind == ModelKind.HF_HUB:
        config = _resolve_hub_config(spec, cache, download=download)
        family = architecture_family(config["model_cfg"])
        if family is None:
            raise ModelLoadError(
                f"{spec} is an open_clip model annotator cannot extract features from"
            )
        with tempfile.TemporaryDirectory(prefix="annotator-hub-") as folder:
            # open_clip's local-dir loader wants the config and weights side by side.
            (Path(folder) / HF_CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")
            os.symlink(weights, Path(folder) / weights.name)
            model = _convert_load_errors(
                spec,
                weights,
                lambda: open_clip.create_model(
                    f"local-dir:{folder}",
                    precision=precision,
                    device=device,
                    require_pretrained=True,
                ),
            )
        return model, config["model_cfg"]

    arch = str(spec.arch)
    model_config = open_clip.get_model_config(arch)
    options: dict[str, Any] = {}
    if spec.kind == ModelKind.PRETRAINED:
        tag_config = get_pretrained_cfg(arch, str(spec.tag))
        # A tag trained with QuickGELU needs it, whatever the architecture's default.
        options["force_quick_gelu"] = bool(tag_config.get("quick_gelu", False))
        options["force_preprocess_cfg"] = merge_preprocess_dict({}, tag_config)
    model = _convert_load_errors(
        spec,
        weights,
        lambda: open_clip.create_model(
            arch,
            pretrained=str(weights),
            precision=precision,
            device=device,
            require_pretrained=True,
            **options,
        ),
    )
    return model, model_config


def _create_demo(
    weights: Path, device: torch.device, precision: str
) -> tuple[torch.nn.Module, dict[str, Any]]:
    from annotator.models import demo

    config = demo.demo_model_config()
    arguments = dict(config)
    model_class = CustomTextCLIP if arguments.pop("custom_text", False) else CLIP
    cast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    model = model_class(**arguments, cast_dtype=cast_dtype)
    spec = ModelSpec(kind=ModelKind.DEMO)
    state = _convert_load_errors(
        spec, weights, lambda: torch.load(weights, map_location="cpu", weights_only=True)
    )
    _convert_load_errors(spec, weights, lambda: model.load_state_dict(state))
    model.to(device=device)
    if cast_dtype is not None:
        convert_weights_to_lp(model, dtype=cast_dtype)
    size = model.visual.image_size
    set_model_preprocess_cfg(model, merge_preprocess_dict(PreprocessCfg(size=size), {}))
    return model, config


def _finish_precision(model: torch.nn.Module, precision: str) -> None:
    """Keep an fp32 model in fp32 even when its checkpoint was saved in half precision."""
    if precision == "fp32":
        model.float()


def load_model(
    spec: ModelSpec | str,
    *,
    device: str | torch.device | None = None,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    arch: str | None = None,
    download: bool = True,
) -> VisionLanguageModel:
    """Load the model of ``spec`` and wrap it for feature extraction.

    Parameters
    ----------
    spec
        A :class:`ModelSpec`, or a string parsed with ``arch``.
    device
        ``cuda``, ``cpu``, ``cuda:N``; None or ``auto`` picks CUDA when available.
    precision
        ``auto`` (bf16 or fp16 on CUDA, fp32 on the CPU), ``fp32``, ``fp16`` or ``bf16``.
        Weights saved in half precision are cast to fp32 on the CPU.
    cache_dir
        The Hugging Face hub cache for pretrained and hub specs (default ``$HF_HUB_CACHE`` or
        ``$HF_HOME/hub``), or annotator's cache root for the demo model (default
        ``$ANNOTATOR_CACHE_DIR`` or ``~/.cache/annotator``).
    arch
        Architecture of a checkpoint path given as a string ``spec``.
    download
        Whether missing files may be downloaded from the Hugging Face Hub. Even when True,
        nothing is downloaded in offline mode (``HF_HUB_OFFLINE=1``) or when the hub does not
        respond to a metadata request within ``NETWORK_TIMEOUT_S`` seconds.

    Raises
    ------
    ModelLoadError
        When the weights are unavailable (the message explains how to supply them), do not fit
        the architecture, or the towers are not supported.
    ConfigError
        For an invalid spec, device or precision.
    """
    if isinstance(spec, str):
        spec = ModelSpec.parse(spec, arch=arch)
    resolved_device = resolve_device(device)
    resolved_precision = resolve_precision(precision, resolved_device)
    logger.info("loading %s on %s in %s", spec, resolved_device, resolved_precision)

    # 1. Locate the weights: local first, download only when allowed and the hub responds.
    weights = resolve_weights(spec, cache_dir=cache_dir, download=download)

    # 2. Build the open_clip model and load the weights.
    if spec.kind == ModelKind.DEMO:
        model, model_config = _create_demo(weights, resolved_device, resolved_precision)
        tokenizer_cache = None
        cache_key = demo_cache_key(weights)
    else:
        model, model_config = _create_open_clip(
            spec,
            weights,
            resolved_device,
            resolved_precision,
            hub_cache_dir(cache_dir),
            download=download,
        )
        tokenizer_cache = cache_dir
        cache_key = spec.cache_key
    _finish_precision(model, resolved_precision)

    # 3. Wrap it. The tokenizer is built now, so a missing one fails here and not mid-run.
    tokenizer = build_tokenizer(model_config, cache_dir=tokenizer_cache, download=download)
    return VisionLanguageModel(model, tokenizer=tokenizer, name=str(spec), cache_key=cache_key)


def create_untrained_model(
    arch: str, *, device: str | torch.device | None = None, precision: str = "auto"
) -> VisionLanguageModel:
    """Build a randomly initialised open_clip architecture, for tests and benchmarks.

    Its outputs carry no meaning. The tokenizer is built when possible; when it is not (a
    SigLIP tokenizer without ``transformers``), :meth:`VisionLanguageModel.tokenize` raises.
    """
    name = check_architecture(arch)
    resolved_device = resolve_device(device)
    resolved_precision = resolve_precision(precision, resolved_device)
    model = open_clip.create_model(
        name, pretrained=None, precision=resolved_precision, device=resolved_device
    )
    _finish_precision(model, resolved_precision)
    tokenizer = None
    tokenizer_error = None
    try:
        tokenizer = build_tokenizer(open_clip.get_model_config(name))
    except ModelLoadError as error:
        tokenizer_error = str(error)
        logger.warning("no tokenizer for untrained %s: %s", name, error)
    logger.warning("%s has random weights; its features are for tests and benchmarks only", name)
    return VisionLanguageModel(
        model, tokenizer=tokenizer, tokenizer_error=tokenizer_error, name=f"{name} (untrained)"
    )


def check_model(
    spec: ModelSpec | str, *, cache_dir: str | Path | None = None, arch: str | None = None
) -> ModelCheck:
    """Check that ``spec`` loads on this machine from local files, without downloading.

    The model is loaded on the CPU and one image and one prompt are encoded.

    Returns
    -------
    ModelCheck
        ``ok`` with the dimensions and weights file, or not ``ok`` with the reason and how
        to fix it.
    """
    try:
        if isinstance(spec, str):
            spec = ModelSpec.parse(spec, arch=arch)
        weights = resolve_weights(spec, cache_dir=cache_dir, download=False)
        model = load_model(
            spec, device="cpu", precision="fp32", cache_dir=cache_dir, download=False
        )
        size = model.model.visual.image_size
        height, width = (size, size) if isinstance(size, int) else size
        embedding = model.encode_image(torch.zeros(1, 3, height, width))
        model.encode_text(model.tokenize(["a photo of a cat."]))
    except (ModelLoadError, ConfigError) as error:
        return ModelCheck(ok=False, message=str(error))
    summary = describe(model)
    return ModelCheck(
        ok=True,
        message=(
            f"{spec} loads from {weights}: kind={summary['kind']}, image features p={summary['image_dim']}, "
            f"text features q={summary['text_dim']}, embeddings D={summary['embed_dim']} "
            f"({embedding.shape[1]} checked), image offset={summary['has_image_offset']}"
        ),
    )
