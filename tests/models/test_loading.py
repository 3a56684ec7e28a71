"""Loading models from specs: local caches, fast offline failures, precision and the demo.

No test reaches another host. ``network_guard`` replaces DNS lookups and socket connections
for every address except the loopback interface, and records each attempt it blocks.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub.utils import _detect_agent as detect_agent
from open_clip.transformer import QuickGELU
from torch.testing import assert_close

from annotator.errors import ConfigError, ModelLoadError
from annotator.models.loading import (
    NETWORK_TIMEOUT_S,
    check_model,
    create_untrained_model,
    hub_cache_dir,
    load_model,
    resolve_device,
    resolve_precision,
    resolve_weights,
)
from annotator.models.specs import ModelSpec
from annotator.models.towers import VisionLanguageModel

from .helpers import TINY_CONFIG, make_tiny_clip

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
OFFLINE_LIMIT_S = 5.0


@pytest.fixture
def network_guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Block DNS and connections to anything but loopback; return the blocked attempts."""
    blocked: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(host, bytes):
            host = host.decode()
        if host in LOOPBACK:
            return real_getaddrinfo(host, *args, **kwargs)
        blocked.append(f"dns {host}")
        raise socket.gaierror(socket.EAI_NONAME, f"DNS lookup of {host} blocked by the test")

    def connect(self, address):  # type: ignore[no-untyped-def]
        host = address[0] if isinstance(address, tuple) else str(address)
        if host in LOOPBACK:
            return real_connect(self, address)
        blocked.append(f"connect {host}")
        raise OSError(errno.ENETUNREACH, f"connection to {host} blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    # huggingface_hub 2.4 builds its user agent from a registry that it fetches from
    # huggingface.co once per process, whatever HF_ENDPOINT is set to. Starting with an empty
    # registry keeps that request out of the attempts that these tests check.
    monkeypatch.setattr(detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    return blocked


@pytest.fixture
def empty_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HF_HOME at an empty folder and clear the other hub settings."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never sends a response."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=2)
        for connection in accepted:
            connection.close()
        server.close()


class LocalHub:
    """A minimal Hugging Face Hub on 127.0.0.1: serves ``/ORG/NAME/resolve/REV/FILE``.

    It responds to HEAD and GET with the headers huggingface_hub 2.4 reads (``X-Repo-Commit``,
    ``ETag``, ``Content-Length``), 404 with ``X-Error-Code: EntryNotFound`` for other files,
    and records every request path.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _respond(self, with_body: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                parts = self.path.split("?")[0].strip("/").split("/")
                key = (
                    f"{parts[0]}/{parts[1]}/{parts[4]}"
                    if len(parts) == 5 and parts[2] == "resolve"
                    else ""
                )
                body = hub.files.get(key)
                if body is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                # One commit for the whole repository, as on the real hub.
                repo_id = "/".join(parts[:2])
                self.send_header("X-Repo-Commit", hashlib.sha1(repo_id.encode()).hexdigest())
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's method name)
                self._respond(with_body=False)

            def do_GET(self) -> None:  # noqa: N802 (http.server's method name)
                self._respond(with_body=True)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def fill_hub_cache(cache: Path, repo_id: str) -> Path:
    """Create the Hugging Face cache layout of ``repo_id`` and return its snapshot folder."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _image(model: VisionLanguageModel) -> torch.Tensor:
    size = model.model.visual.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))


# 1. Failing fast without the weights


@pytest.mark.parametrize(
    "text", ["hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "ViT-B-32:laion2b_s34b_b79k"]
)
def test_offline_fails_fast(
    text: str, empty_hf_home: Path, network_guard: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        load_model(text, device="cpu")
    elapsed = time.perf_counter() - started

    assert elapsed < OFFLINE_LIMIT_S
    message = str(caught.value)
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert "--model PATH --arch" in message
    assert "HF_HOME" in message
    assert "HF_HUB_CACHE" in message
    assert str(empty_hf_home / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K") in message
    assert network_guard == []


def test_no_network_fails_fast(empty_hf_home: Path, network_guard: list[str]) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        load_model("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", device="cpu")
    elapsed = time.perf_counter() - started

    assert elapsed < OFFLINE_LIMIT_S
    assert "did not respond" in str(caught.value)
    assert "--model PATH --arch" in str(caught.value)
    assert network_guard, "the hub was never tried, so this test checked nothing"
    assert all(attempt.startswith(("dns", "connect")) for attempt in network_guard)


def test_silent_hub_times_out(
    empty_hf_home: Path,
    network_guard: list[str],
    silent_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", silent_server)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="did not respond"):
        load_model("ViT-B-32:laion2b_s34b_b79k", device="cpu")
    elapsed = time.perf_counter() - started

    assert NETWORK_TIMEOUT_S - 0.5 < elapsed < OFFLINE_LIMIT_S
    assert network_guard == []


def test_downloads_from_responding_hub(
    tmp_path: Path, empty_hf_home: Path, network_guard: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = make_tiny_clip(seed=5)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    files = {
        "test-org/tiny-clip/open_clip_config.json": json.dumps({"model_cfg": TINY_CONFIG}).encode(),
        "test-org/tiny-clip/open_clip_pytorch_model.bin": buffer.getvalue(),
    }
    with LocalHub(files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        model = load_model("hf-hub:test-org/tiny-clip", device="cpu")

    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = original.eval().encode_image(pixels)
    assert_close(model.encode_image(pixels), expected, rtol=1e-5, atol=1e-5)
    # safetensors is asked for first, then the pickle file that the hub has.
    heads = [request for request in hub.requests if request.startswith("HEAD")]
    assert any("open_clip_model.safetensors" in request for request in heads)
    assert any("open_clip_pytorch_model.bin" in request for request in heads)
    cached = empty_hf_home / "hub" / "models--test-org--tiny-clip"
    assert list(cached.glob("snapshots/*/open_clip_pytorch_model.bin"))
    assert network_guard == []

    # Offline now, the cached copy is used without contacting the hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_model("hf-hub:test-org/tiny-clip", device="cpu").cache_key == model.cache_key


def test_check_model_reports_missing(empty_hf_home: Path, network_guard: list[str]) -> None:
    result = check_model("ViT-B-32:openai")
    assert result.ok is False
    assert "not in the local Hugging Face cache" in result.message
    assert network_guard == []


def test_hub_cache_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "first"))
    assert hub_cache_dir() == tmp_path / "first" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "second"))
    assert hub_cache_dir() == tmp_path / "second"
    assert hub_cache_dir(tmp_path / "third") == tmp_path / "third"


# 2. Loading from local files


def test_cached_hub_repo_loads_offline(
    tmp_path: Path, empty_hf_home: Path, network_guard: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = make_tiny_clip(seed=3)
    snapshot = fill_hub_cache(empty_hf_home / "hub", "test-org/tiny-clip")
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG}))
    torch.save(original.state_dict(), snapshot / "open_clip_pytorch_model.bin")

    model = load_model("hf-hub:test-org/tiny-clip", device="cpu")

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original.eval().encode_image(pixels)
    assert_close(model.encode_image(pixels), expected, rtol=1e-5, atol=1e-5)
    assert model.cache_key == ModelSpec.parse("hf-hub:test-org/tiny-clip").cache_key
    assert model.tokenize(["a photo"]).shape == (1, 16)
    assert network_guard == []

    result = check_model("hf-hub:test-org/tiny-clip")
    assert result.ok, result.message
    assert "p=32" in result.message
    assert "D=16" in result.message


def test_tag_weights_prefer_safetensors(tmp_path: Path) -> None:
    snapshot = fill_hub_cache(tmp_path, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"pickle")
    spec = ModelSpec.parse("ViT-B-32:laion2b_s34b_b79k")
    assert (
        resolve_weights(spec, cache_dir=tmp_path, download=False).name
        == "open_clip_pytorch_model.bin"
    )
    (snapshot / "open_clip_model.safetensors").write_bytes(b"safetensors")
    assert (
        resolve_weights(spec, cache_dir=tmp_path, download=False).name
        == "open_clip_model.safetensors"
    )


def test_half_tag_checkpoint_loads_fp32(
    tmp_path: Path,
    vit_b32: VisionLanguageModel,
    network_guard: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The openai tag of ViT-B-32 needs QuickGELU, which its architecture config lacks.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fill_hub_cache(tmp_path, "timm/vit_base_patch32_clip_224.openai")
    half_state = {name: value.half() for name, value in vit_b32.model.state_dict().items()}
    torch.save(half_state, snapshot / "open_clip_pytorch_model.bin")

    model = load_model("ViT-B-32:openai", device="cpu", cache_dir=tmp_path)

    assert all(p.dtype == torch.float32 for p in model.model.parameters())
    assert model.dtype == torch.float32
    loaded = model.model.state_dict()
    for name, value in half_state.items():
        assert torch.equal(loaded[name], value.float()), name
    assert isinstance(model.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    features = model.image_features(_image(model))
    assert features.features.dtype == torch.float32
    assert bool(torch.isfinite(features.features).all())
    assert network_guard == []


def test_half_checkpoint_file_on_cpu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-S-32-alt", pretrained=None)
    half_state = {name: value.half() for name, value in reference.state_dict().items()}
    weights = tmp_path / "vit-s-32-alt-fp16.pt"
    torch.save(half_state, weights)

    model = load_model(str(weights), arch="ViT-S-32-alt", device="cpu")

    reference.load_state_dict({name: value.float() for name, value in half_state.items()})
    pixels = _image(model)
    with torch.no_grad():
        expected = reference.eval().encode_image(pixels)
    assert model.dtype == torch.float32
    assert_close(model.encode_image(pixels), expected, rtol=1e-4, atol=1e-4)
    assert model.cache_key == ModelSpec.parse(str(weights), arch="ViT-S-32-alt").cache_key


def test_checkpoint_of_other_arch_rejected(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.pt"
    torch.save(make_tiny_clip().state_dict(), weights)
    with pytest.raises(ModelLoadError, match="cannot load the weights .*tiny.pt for"):
        load_model(str(weights), arch="ViT-S-32-alt", device="cpu")


def test_corrupt_checkpoint_rejected(tmp_path: Path) -> None:
    weights = tmp_path / "broken.pt"
    weights.write_bytes(b"these bytes are not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        load_model(str(weights), arch="ViT-S-32-alt", device="cpu")


# 3. The demo model


def test_demo_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="run `annotator demo`"):
        load_model("demo", device="cpu", cache_dir=tmp_path)


def test_demo_loads_saved_weights(tmp_path: Path) -> None:
    from annotator.models import demo

    torch.manual_seed(0)
    original = demo.create_demo_model()
    folder = demo.demo_model_dir(tmp_path)
    folder.mkdir(parents=True)
    torch.save(original.state_dict(), folder / "weights.pt")

    model = load_model("demo", device="cpu", cache_dir=tmp_path)

    pixels = _image(model)
    with torch.no_grad():
        expected = original.eval().encode_image(pixels)
    assert_close(model.encode_image(pixels), expected, rtol=1e-5, atol=1e-5)
    assert model.cache_key is not None
    assert model.cache_key.startswith("demo--")
    assert model.context_length == demo.demo_model_config()["text_cfg"]["context_length"]


# 4. Devices and precision


def test_precision_choices_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp32", cpu) == "fp32"
    for half in ("fp16", "bf16"):
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            resolve_precision(half, cpu)
    with pytest.raises(ConfigError, match="invalid precision 'fp8'"):
        resolve_precision("fp8", cpu)


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match="invalid device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_untrained_unknown_arch() -> None:
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        create_untrained_model("ViT-Nope")
