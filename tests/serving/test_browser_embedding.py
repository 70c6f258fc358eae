"""In-browser embedding in headless Chromium: the page runs the exported ONNX query model with ONNX Runtime Web
and gets the same embeddings, the same preprocessed pixels and the same answers as cmpnas in Python; where the
runtime cannot load, or a model has no .onnx, it uploads the image instead and says so.

Needs Debian's ``chromium`` and ``chromium-driver`` (apt), ``selenium`` (pip) and ONNX Runtime Web installed by
``scripts/setup.sh`` (``npm ci`` in web/).
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from browser_support import CHROMIUM, chromium, serving
from fixtures_serving import QUERY_KW
from fixtures_serving import png_bytes as encode
from PIL import Image

from cmpnas.data.transforms import pil_to_uint8
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, save_model
from cmpnas.serving.app import create_app
from cmpnas.serving.browser import ORT_FILES, checkout_runtime_dir
from cmpnas.serving.uploads import decode_upload

RUNTIME = checkout_runtime_dir()
KINDS = ("stripes", "checks", "blobs")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium chromium-driver"
    ),
]
needs_runtime = pytest.mark.skipif(
    not (RUNTIME / "ort.wasm.min.mjs").exists(),
    reason="needs ONNX Runtime Web: run scripts/setup.sh on a machine with npm (npm ci in web/)",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        driver.set_script_timeout(180)
        yield driver


@pytest.fixture(scope="module")
def rgb_onnx(models: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-channel query model with another input size (32) and per-channel mean/std, compatible with the
    gallery, exported to ONNX: the page's RGB path, upscaling and normalisation."""
    from cmpnas.serving.export import export_onnx

    d = tmp_path_factory.mktemp("rgb")
    torch.manual_seed(5)
    spec = ModelSpec(
        backbone="resnet_small",
        backbone_kwargs=QUERY_KW,
        embed_dim=16,
        in_chans=3,
        input_size=32,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        compatible_with=models.gallery_fp,
    )
    save_model(EmbeddingModel(spec).eval(), d / "rgb.safetensors")
    export_onnx(d / "rgb.safetensors", d / "rgb.onnx", exporter="legacy", measure=False)
    return d / "rgb.onnx"


@pytest.fixture(scope="module")
def family(
    flat_index: Path, onnx_query: Path, rgb_onnx: Path, small_query: Path
) -> Iterator[tuple[str, Any]]:
    """'query' (ONNX, 1 channel, 28 px; the default), 'rgb' (ONNX, 3 channels, 32 px) and 'small' (a torch
    checkpoint: no .onnx for the browser) against one index, with the installed runtime."""
    app = create_app(flat_index, onnx_query, rgb_onnx, small_query, watch_index_s=0, ort_web_dir=RUNTIME)
    with serving(app) as url:
        yield url, app.state.service


def parity_images(pattern: Any) -> list[tuple[str, bytes]]:
    """220 PNGs: at the models' input sizes (28 and 32 px), ones needing a resize (down, up, non-square,
    extreme aspect), grey, palette and opaque RGBA."""
    images: list[tuple[str, Image.Image]] = []
    for i in range(80):
        images.append((f"at-size-{i}", pattern(KINDS[i % 3], 5000 + i, size=28 if i % 2 else 32)))
    for i in range(60):
        images.append((f"40px-{i}", pattern(KINDS[i % 3], 6000 + i)))
    shapes = [
        (37, 61),
        (61, 37),
        (29, 28),
        (90, 50),
        (33, 100),
        (64, 64),
        (28, 40),
        (45, 30),
        (120, 17),
        (13, 11),
    ]
    for i in range(40):
        w, h = shapes[i % len(shapes)]
        big = pattern(KINDS[i % 3], 7000 + i, size=128)
        images.append((f"{w}x{h}-{i}", big.crop((i % 7, i % 5, i % 7 + w, i % 5 + h))))
    for i in range(20):
        images.append(
            (f"grey-{i}", pattern(KINDS[i % 3], 8000 + i, size=(28, 32, 50, 23)[i % 4]).convert("L"))
        )
    for i in range(10):
        images.append((f"palette-{i}", pattern(KINDS[i % 3], 9000 + i).convert("P")))
    for i in range(10):
        images.append((f"rgba-{i}", pattern(KINDS[i % 3], 9500 + i, size=30).convert("RGBA")))
    return [(name, encode(img)) for name, img in images]


def _open(browser: Any, url: str) -> dict[str, Any]:
    """Load the page and wait until its in-browser embedding is ready or unavailable; its engine state."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script("return window.cmpnasPage && window.cmpnasPage.engine.state !== 'loading'")
    )
    return browser.execute_script("return window.cmpnasPage.engine")


EMBED_BATCH = """
const [items, name, done] = arguments;
(async () => {
  const out = [];
  for (const b64 of items) {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    const r = await window.cmpnasPage.embed(new Blob([bytes], {type: "image/png"}), name);
    out.push({raw: Array.from(r.raw), pixels: btoa(String.fromCharCode(...r.pixels))});
  }
  return out;
})().then(done, (err) => done({error: String(err && err.stack || err)}));
"""

SEARCH_BATCH = """
const [items, name, dtype, done] = arguments;
(async () => {
  const out = [];
  for (const b64 of items) {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    const r = await window.cmpnasPage.search(new Blob([bytes], {type: "image/png"}), 10, name, dtype);
    out.push({path: r.path, reason: r.reason || null, status: r.resp.status, bytes: r.requestBytes,
              ids: r.resp.ok ? r.data.results.map((h) => h.id) : null});
  }
  return out;
})().then(done, (err) => done({error: String(err && err.stack || err)}));
"""


def _run_batches(browser: Any, script: str, pngs: list[bytes], *args: str, batch: int = 55) -> list[dict]:
    out: list[dict] = []
    for start in range(0, len(pngs), batch):
        chunk = [base64.b64encode(p).decode() for p in pngs[start : start + batch]]
        got = browser.execute_async_script(script, chunk, *args)
        assert isinstance(got, list), got
        out.extend(got)
    return out


@needs_runtime
@pytest.mark.parametrize("name", ["query", "rgb"])
def test_browser_embeddings_and_answers_match_python(
    family: tuple[str, Any], browser: Any, pattern: Any, name: str
) -> None:
    """>= 200 images: the page's preprocessed pixels equal pil_to_uint8's byte for byte, its ORT Web embedding
    has cosine >= 0.9999 with Python ONNX Runtime's, and its vector search (float32, as the page sends it)
    returns the same top 10 as the image upload for >= 99% of them."""
    _check_parity(*family, browser, pattern, name)


@pytest.fixture(
    scope="module", params=[("per-tensor", False), ("per-channel", False), ("per-tensor", True)], ids=str
)
def int8_query(
    onnx_query: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Path:
    """The fixtures' ONNX query model quantized to int8 (QDQ), calibrated on seeded normalised noise: what
    matters here is that the browser and Python run the same int8 file alike, with one weight scale per tensor
    and per output channel (``auto`` mixes the two), and with 7-bit weights (``reduce_range``)."""
    from cmpnas.serving.encoder import INPUT_NAME, META_QUANTIZATION, load_encoder
    from cmpnas.serving.quantize import quantize_file

    spec = load_encoder(onnx_query).spec
    rng = np.random.default_rng(0)
    shape = (16, spec.in_chans, spec.input_size, spec.input_size)
    batches = [{INPUT_NAME: rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]

    class Reader:
        def __init__(self) -> None:
            self.rest = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.rest, None)

        def rewind(self) -> None:
            self.rest = iter(batches)

    granularity, reduce_range = request.param
    out = tmp_path_factory.mktemp(f"int8-{granularity}") / "int8.onnx"
    quantize_file(onnx_query, out, Reader(), granularity, {META_QUANTIZATION: "{}"}, reduce_range)  # type: ignore[arg-type]
    return out


@needs_runtime
def test_int8_query_model_runs_in_the_browser_like_in_python(
    flat_index: Path, int8_query: Path, browser: Any, pattern: Any
) -> None:
    app = create_app(flat_index, int8_query, watch_index_s=0, ort_web_dir=RUNTIME)
    with serving(app) as url:
        service = app.state.service
        assert service.members["int8"].encoder.kind == "onnx-int8"
        _check_parity(url, service, browser, pattern, "int8")


def _int8_kernels_exact() -> bool:
    """ONNX Runtime's x86 int8 kernels sum exactly with VNNI. Without it (AVX2 only) they multiply-add through
    VPMADDUBSW, whose 16-bit pair sums can saturate (ONNX Runtime's quantization guide), so Python's int8
    embedding drifts slightly from ORT Web's (WebAssembly) on such a CPU; fp32 models are unaffected."""
    cpuinfo = Path("/proc/cpuinfo")
    return not cpuinfo.is_file() or "vnni" in cpuinfo.read_text()


def _seven_bit_weights(path: Path) -> bool:
    """A file quantized with ``reduce_range``: its int8 convolution weights stay within 7 bits, so the pair sums of
    a CPU without VNNI cannot saturate and every runtime computes the same int32 sums."""
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if len(i.dims) == 4]
    return bool(weights) and all(w.dtype == np.int8 and np.abs(w.astype(np.int16)).max() <= 64 for w in weights)


def _check_parity(url: str, service: Any, browser: Any, pattern: Any, name: str) -> None:
    engine = _open(browser, url)
    assert engine["state"] == "ready", engine
    member = service.members[name]
    spec = member.encoder.spec
    images = parity_images(pattern)
    assert len(images) >= 200
    pngs = [png for _, png in images]

    got = _run_batches(browser, EMBED_BATCH, pngs, name)
    pil = [decode_upload(png, "image/png", 10**8) for png in pngs]
    want_pixels = [pil_to_uint8(im, spec.in_chans, spec.input_size).numpy().transpose(1, 2, 0) for im in pil]
    pixel_mismatch = [
        images[i][0]
        for i, g in enumerate(got)
        if not np.array_equal(
            np.frombuffer(base64.b64decode(g["pixels"]), np.uint8), want_pixels[i].reshape(-1)
        )
    ]
    assert not pixel_mismatch, f"preprocessing differs from Python for {pixel_mismatch[:10]}"
    browser_vecs = np.asarray([g["raw"] for g in got], dtype=np.float64)
    python_vecs = member.encoder.embed_images(pil).astype(np.float64)  # ONNX Runtime (Python), normalised
    assert member.encoder.kind in ("onnx", "onnx-int8")
    cos = (browser_vecs @ python_vecs.T).diagonal() / np.linalg.norm(browser_vecs, axis=1)
    worst = int(np.argmin(cos))
    exact = member.encoder.kind == "onnx" or _int8_kernels_exact() or _seven_bit_weights(member.encoder.path)
    assert cos.min() >= (0.9999 if exact else 0.995), f"cosine {cos.min():.6f} for {images[worst][0]}"

    answers = _run_batches(browser, SEARCH_BATCH, pngs, name, "float32")
    assert [a["path"] for a in answers] == ["browser"] * len(pngs), answers[0]
    assert all(a["status"] == 200 and a["bytes"] == 4 * member.encoder.dim for a in answers)
    if not exact:  # the server's saturating int8 sums reorder near neighbours: no top-10 parity to expect
        return
    same = sum(
        a["ids"] == [h["id"] for h in service.answer(png, "image/png", 10, member)]
        for a, png in zip(answers, pngs, strict=True)
    )
    assert same >= 0.99 * len(pngs), f"identical top-10 for {same}/{len(pngs)}"


@needs_runtime
def test_the_page_says_which_path_ran_for_each_model(
    family: tuple[str, Any], browser: Any, tmp_path: Path, pattern: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, service = family
    before = {n: service.counters.combined()["models"][n]["queries"] for n in service.members}
    pattern("stripes", 4).save(tmp_path / "query.png")  # = gallery item stripes/004.png
    wait = WebDriverWait(browser, 60)
    for name, via in (("query", "browser"), ("small", "upload"), ("rgb", "browser")):
        _open(browser, url)  # a fresh page per model: changing the model re-runs the last search
        engine_text = browser.find_element(By.ID, "engine").text
        assert "in-browser embedding ready" in engine_text and "ONNX Runtime Web" in engine_text
        Select(browser.find_element(By.ID, "model")).select_by_visible_text(name)
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "query.png"))
        wait.until(lambda d: "10 results" in d.find_element(By.ID, "status").text)
        path = browser.find_element(By.ID, "path")
        assert path.get_attribute("data-path") == via, (name, path.text)
        assert f"query model {name}" in browser.find_element(By.ID, "status").text
        if via == "browser":
            assert "embedded in this browser in" in path.text and f"sent {4 * 16} bytes (float32" in path.text
        else:
            assert "uploaded the image" in path.text and "cmpnas export" in path.text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results .hit")) == 10
    after = {n: service.counters.combined()["models"][n]["queries"] for n in service.members}
    assert {n: after[n] - before[n] for n in after} == {"query": 1, "rgb": 1, "small": 1}

    (tmp_path / "notes.txt").write_text("not an image")  # the browser cannot decode it: the server's answer
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.txt"))
    wait.until(lambda d: "Error 415" in d.find_element(By.ID, "status").text)
    path = browser.find_element(By.ID, "path")
    assert path.get_attribute("data-path") == "upload" and "could not decode" in path.text


F16_CHECK = """
const [bits, done] = arguments;
const f = new Float32Array(Uint32Array.from(bits).buffer);
done(Array.from(f, (v) => CmpnasEmbed.toFloat16(v)));
"""


@needs_runtime
def test_float16_vectors_round_like_numpy_and_search(
    family: tuple[str, Any], browser: Any, pattern: Any
) -> None:
    """The page's float16 encoding gives numpy's bits (round to nearest even, subnormals, overflow), and a
    float16 search from the page answers with a 2-bytes-a-value body."""
    url, service = family
    _open(browser, url)
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [rng.standard_normal(2000).astype(np.float32) * s for s in (1e-7, 1e-5, 1e-3, 0.1, 1, 1e3, 6e4)]
        + [
            np.array(
                [0, -0.0, 65504, 65519.99, 65520, 5.96e-8, 2.98e-8, 2.99e-8, 1e-45, np.inf, -np.inf],
                np.float32,
            )
        ]
    ).astype(np.float32)
    got = browser.execute_async_script(F16_CHECK, values.view(np.uint32).tolist())
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).view(np.uint16)
    assert np.array_equal(np.asarray(got, dtype=np.uint16), want)
    pngs = [encode(pattern(KINDS[i % 3], 300 + i)) for i in range(6)]
    answers = _run_batches(browser, SEARCH_BATCH, pngs, "query", "float16")
    assert all(a["path"] == "browser" and a["status"] == 200 and a["bytes"] == 2 * 16 for a in answers), (
        answers
    )
    assert all(len(a["ids"]) == 10 for a in answers)


def _fallback_case(case: str, tmp_path: Path) -> Path:
    """A runtime folder that cannot work: missing, or with a broken WebAssembly binary."""
    if case == "missing":
        return tmp_path / "no-runtime"
    broken = tmp_path / "onnxruntime-web" / "dist"
    broken.mkdir(parents=True)
    shutil.copy(RUNTIME.parent / "package.json", broken.parent / "package.json")
    for name in ORT_FILES:
        if name.endswith(".wasm"):
            (broken / name).write_bytes(b"\0asm not really webassembly")
        else:
            shutil.copy(RUNTIME / name, broken / name)
    return broken


@pytest.mark.parametrize("case", ["missing", pytest.param("broken", marks=needs_runtime)])
def test_without_a_working_runtime_the_page_uploads_and_says_so(
    case: str, flat_index: Path, onnx_query: Path, browser: Any, tmp_path: Path, pattern: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(flat_index, onnx_query, watch_index_s=0, ort_web_dir=_fallback_case(case, tmp_path))
    with serving(app) as url:
        engine = _open(browser, url)
        assert engine["state"] == "unavailable"
        engine_text = browser.find_element(By.ID, "engine").text
        assert "in-browser embedding unavailable" in engine_text and "uploaded instead" in engine_text
        assert ("not installed" if case == "missing" else "could not start") in engine_text
        pattern("checks", 5).save(tmp_path / "query.png")
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "query.png"))
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "10 results" in d.find_element(By.ID, "status").text)
        path = browser.find_element(By.ID, "path")
        assert path.get_attribute("data-path") == "upload"
        assert "uploaded the image" in path.text and engine["reason"] in path.text
        imgs = browser.find_elements(By.CSS_SELECTOR, "#results img")
        assert len(imgs) == 10
        counts = app.state.service.counters.combined()
        assert counts["queries"] == 1 and counts["rejected"] == 0
