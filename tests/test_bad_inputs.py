"""Bad input everywhere, as one table (docs/reliability.md, section "Bad input", lists it for users).

Every row makes one bad input under its own folder, runs one command or request on it, and checks:
- CLI: exit code 2 and ONE line on stderr, ``cmpnas: error: <problem> Fix: <fix>``, containing the
  row's fragments (``via="main"`` runs ``cmpnas.cli.main`` in this process, ``via="subprocess"`` runs
  ``python -m cmpnas.cli`` as a user does);
- service: the row's 4xx status and a JSON body whose ``detail`` is a string containing the fragments;
- and that nothing on disk changed: every file and folder under the row's folder and under the shared
  fixture folders it used keeps its name, size, mtime and hash.
Rows marked ``accepted`` are valid inputs that must be converted and used (CMYK, 16-bit), not refused;
the slow-client row checks that the server keeps answering other clients.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from fixtures_protocols import (
    DeepFashion2Fixture,
    IJBCFixture,
    make_deepfashion2_fixture,
    make_ijbc_fixture,
)
from fixtures_serving import Models, flat_index, gallery_dir, models, png_header_only  # noqa: F401 (fixtures)
from fixtures_serving import png_bytes as encode
from PIL import Image
from safetensors.torch import save_file

import cmpnas
from cmpnas.cli import main
from cmpnas.data.deepfashion2 import item_id_for
from cmpnas.models.embedding import FORMAT, EmbeddingModel, ModelSpec
from cmpnas.serving.app import create_app
from cmpnas.serving.index import GalleryIndex

SRC = Path(cmpnas.__file__).resolve().parents[1]
DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
DOC_SECTION = "## Bad input"
MAX_UPLOAD, MAX_K, MAX_PIXELS = 50_000, 20, 1_000_000

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- the row types
@dataclass(frozen=True)
class Cli:
    """``cmpnas ARGS``, in this process or as a real subprocess."""

    args: list[Any]
    subprocess: bool = False


@dataclass(frozen=True)
class Http:
    """One POST /search against the real app (FastAPI TestClient)."""

    files: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    content: Any = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Custom:
    """Anything else (the slow client): a function of the context returning the outcome."""

    run: Callable[[Ctx], Outcome]


@dataclass
class Outcome:
    code: int  # exit code or HTTP status
    message: str  # stderr (CLI) or the JSON ``detail`` (service)
    stdout: str = ""
    body: Any = None


@dataclass(frozen=True)
class Row:
    id: str
    make: Callable[[Ctx], Cli | Http | Custom]  # makes the bad input, returns what to run on it
    expect: tuple[str, ...]  # fragments of the one-line message / the JSON detail
    status: int = 2  # CLI exit code, or HTTP status
    accepted: bool = False  # a valid input to convert and use: success expected, not an error
    check: Callable[[Ctx, Outcome], None] | None = None  # extra assertions
    absent: tuple[str, ...] = ()  # fragments the message must not contain (bad advice)


# ------------------------------------------------------------------------------------------- context
@dataclass
class Ctx:
    """The row's folder, lazy access to the shared fixtures, and the folders to snapshot."""

    work: Path
    request: pytest.FixtureRequest
    watched: list[Path] = field(default_factory=list)

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)

    def watch(self, path: Path) -> Path:
        self.watched.append(path if path.is_dir() else path.parent)
        return path

    @property
    def out(self) -> Path:
        return self.work / "out"

    def write(self, name: str, content: bytes | str) -> Path:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
        return path

    def config(self, change: Callable[[dict], None] | None = None, name: str = "tiny.yaml") -> Path:
        """The tiny test config as YAML, optionally changed first."""
        raw = copy.deepcopy(self.fixture("tiny_raw"))
        if change is not None:
            change(raw)
        return self.write(name, yaml.safe_dump(raw))

    def image(self, name: str, seed: int = 1, fmt: str = "PNG") -> Path:
        self.write(name, b"")
        self.fixture("pattern")("stripes", seed).save(self.work / name, format=fmt)
        return self.work / name

    @property
    def nets(self) -> Models:
        nets: Models = self.fixture("models")
        self.watch(nets.gallery.parent)
        return nets

    @property
    def index(self) -> Path:
        self.watch(self.fixture("gallery_dir"))
        return self.watch(self.fixture("flat_index"))

    @property
    def tiny_gallery(self) -> Path:
        return self.watch(self.fixture("tiny_gallery"))

    def df2(self) -> DeepFashion2Fixture:
        return make_deepfashion2_fixture(self.work, split="validation", n_pairs=3)

    def ijbc(self) -> IJBCFixture:
        return make_ijbc_fixture(self.work, n_subjects=2)


# ------------------------------------------------------------------------------------------- inputs
def grey_pair() -> tuple[Image.Image, Image.Image]:
    """The same picture as an 8-bit and as a 16-bit grayscale image (value v -> v * 257)."""
    yy, xx = np.mgrid[0:40, 0:40]
    grey8 = ((xx * 5 + yy * 2) % 200 + 30).astype(np.uint8)
    return Image.fromarray(grey8), Image.fromarray(grey8.astype(np.uint16) * 257)


def cmyk_image() -> Image.Image:
    """A CMYK picture of cyan / magenta / yellow quadrants (a print-workflow JPEG)."""
    img = Image.new("CMYK", (40, 40), (255, 0, 0, 0))
    img.paste((0, 255, 0, 0), (20, 0, 40, 20))
    img.paste((0, 0, 255, 0), (0, 20, 20, 40))
    return img


def train_folder(ctx: Ctx, *bad: tuple[str, bytes], good: int = 2) -> Path:
    """An ImageFolder root: ``good`` readable images per class in two classes, plus ``bad`` (name, bytes)."""
    root = ctx.work / "images"
    for cls in ("shirt", "shoe"):
        for i in range(good):
            ctx.image(f"images/{cls}/{i}.png", seed=i)
    for name, content in bad:
        ctx.write(f"images/{name}", content)
    return root


def train_on(ctx: Ctx, *settings: str, cfg: Path | None = None, root: Path | None = None) -> Cli:
    """``train-gallery`` on the tiny config with overrides (the data is read before any training)."""
    settings = (*settings, f"data.root={root}") if root is not None else settings
    overrides = [a for s in settings for a in ("--set", s)]
    return Cli(["train-gallery", "-c", cfg or ctx.config(), "-o", ctx.out, *overrides])


def folder_data(ctx: Ctx, root: Path, *settings: str) -> Cli:
    return train_on(ctx, "data.name=folder", *settings, root=root)


def bad_image_in(ctx: Ctx, name: str, content: bytes) -> Cli:
    """A good image folder plus one bad file, read with data.on_bad_image=error."""
    return folder_data(ctx, train_folder(ctx, (name, content)), "data.on_bad_image=error")


def csv_data(ctx: Ctx, text: str | bytes, *settings: str) -> Cli:
    return train_on(ctx, "data.name=csv", *settings, root=ctx.write("list.csv", text))


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def save_raw_model(path: Path, tensors: dict[str, torch.Tensor], spec_json: str) -> Path:
    """A safetensors file with cmpnas metadata around any tensors (to pair a spec with foreign weights)."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "spec": spec_json, "fingerprint": "0" * 16})
    return path


def plain_safetensors(ctx: Ctx) -> Path:
    """A valid safetensors file that no cmpnas command wrote (no spec in its metadata)."""
    save_file({"w": torch.zeros(3)}, str(ctx.work / "plain.safetensors"))
    return ctx.work / "plain.safetensors"


def tiny_net(widths: list[int]) -> EmbeddingModel:
    kw = {"widths": widths, "depths": [1, 1], "strides": [1, 2]}
    return EmbeddingModel(ModelSpec(backbone="resnet_small", backbone_kwargs=kw, embed_dim=16))


# DeepFashion2 / IJB-C: a valid fixture, one file broken, scored from a valid .npz
def df2_ids(fixture: DeepFashion2Fixture) -> list[str]:
    return [item_id_for(image.image_id, item.number) for image, item in fixture.items()]


Arrays = Callable[[list[str]], Any]  # ids -> an array of the .npz (None: leave the array out)
NpzFile = Callable[[Ctx, list[str]], Path]  # writes a whole (bad) embeddings file for these ids


def npz(ctx: Ctx, ids: list[str], name: str = "emb.npz", /, **arrays: Arrays) -> Path:
    """An embeddings .npz: ``ids`` + random 8-dim ``embeddings`` unless ``arrays`` say otherwise."""
    content: dict[str, Any] = {
        "ids": np.array(ids),
        "embeddings": np.random.default_rng(0).normal(size=(len(ids), 8)),
    }
    content.update({key: make(ids) for key, make in arrays.items()})
    path = ctx.work / name
    np.savez(path, **{k: v for k, v in content.items() if v is not None})
    return path


def df2_eval(
    ctx: Ctx,
    breaks: Callable[[DeepFashion2Fixture], None] | None = None,
    npz_file: NpzFile | None = None,
    **arrays: Arrays,
) -> Cli:
    """`evaluate --protocol deepfashion2` on a valid fixture with one thing broken."""
    fixture = ctx.df2()
    ids = df2_ids(fixture)
    emb = npz_file(ctx, ids) if npz_file is not None else npz(ctx, ids, **arrays)
    if breaks is not None:
        breaks(fixture)
    return Cli(
        ["evaluate", "--protocol", "deepfashion2", "--root", fixture.root, "--embeddings", emb, "-o", ctx.out]
    )


def edit_annotation(fixture: DeepFashion2Fixture, change: Callable[[dict], Any]) -> None:
    path = fixture.annotation_path(1)
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def ijbc_eval(ctx: Ctx, breaks: Callable[[IJBCFixture], None] | None = None, **arrays: Arrays) -> Cli:
    """`evaluate --protocol ijbc` on a valid fixture with one thing broken."""
    fixture = ctx.ijbc()
    emb = npz(ctx, list(fixture.names), **arrays)
    if breaks is not None:
        breaks(fixture)
    return Cli(["evaluate", "--protocol", "ijbc", "--root", fixture.root, "--embeddings", emb, "-o", ctx.out])


def drop_column(file: str, line: int = 0) -> Callable[[IJBCFixture], None]:
    """Remove the last column of one line of an IJB-C meta file."""

    def breaks(fixture: IJBCFixture) -> None:
        path = fixture.meta_dir / file
        lines = path.read_text().splitlines()
        lines[line] = " ".join(lines[line].split()[:-1])
        path.write_text("\n".join(lines) + "\n")

    return breaks


def with_value(value: float, row: int = 0) -> Arrays:
    """Random embeddings with ``value`` (NaN, inf) in one row."""

    def make(ids: list[str]) -> np.ndarray:
        emb = np.random.default_rng(0).normal(size=(len(ids), 8))
        emb[row, 3] = value
        return emb

    return make


# service
def upload(data: bytes, content_type: str = "image/png", **params: Any) -> Http:
    return Http(files={"file": ("q", data, content_type)}, params=params or None)


def oversized_chunked_body() -> Http:
    boundary = "cmpnasboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:  # a generator: sent chunked, without Content-Length
        yield head
        for _ in range(2 * MAX_UPLOAD // 10_000):
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    return Http(content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})


def has_hits(k: int) -> Callable[[Ctx, Outcome], None]:
    def check(ctx: Ctx, outcome: Outcome) -> None:
        assert len(outcome.body["results"]) == k, outcome.body

    return check


def same_hits_as_8bit(ctx: Ctx, outcome: Outcome) -> None:
    """The 16-bit upload finds exactly what the same picture in 8 bits finds (PIL alone makes it white)."""
    grey8, _ = grey_pair()
    reference = ctx.fixture("service").post(
        "/search", files={"file": ("q", encode(grey8), "image/png")}, params={"k": 5}
    )
    assert reference.status_code == 200
    got = [(h["id"], round(h["score"], 4)) for h in outcome.body["results"]]
    assert got == [(h["id"], round(h["score"], 4)) for h in reference.json()["results"]]


def indexed_like_their_8bit_twins(ctx: Ctx, outcome: Outcome) -> None:
    """CMYK and 16-bit files are indexed (none skipped) with the vectors of their RGB / 8-bit twins."""
    index = GalleryIndex.load(ctx.work.parent / "idx")
    assert outcome.code == 0 and len(index) == 4
    assert index.manifest["sources"][-1]["skipped_unreadable"] == 0
    vector = {it.id: index.store.index.reconstruct(i) for i, it in enumerate(index.items)}
    np.testing.assert_allclose(vector["grey16.png"], vector["grey8.png"], atol=1e-5)
    assert float(vector["cmyk.jpg"] @ vector["rgb.png"]) > 0.99  # JPEG is lossy: nearly, not exactly


def cmyk_and_16bit_folder(ctx: Ctx) -> Cli:
    grey8, grey16 = grey_pair()
    ctx.write("gallery/grey8.png", encode(grey8))
    ctx.write("gallery/grey16.png", encode(grey16))
    ctx.write("gallery/cmyk.jpg", encode(cmyk_image(), "JPEG"))
    ctx.write("gallery/rgb.png", encode(cmyk_image().convert("RGB")))
    assert Image.open(ctx.work / "gallery/grey16.png").mode.startswith("I")  # really 16-bit on disk
    return Cli(
        [
            "index",
            "--gallery-model",
            ctx.nets.gallery,
            "--images",
            ctx.work / "gallery",
            "--out",
            ctx.work.parent / "idx",  # the output, outside the folder checked for changes
        ]
    )


# the slow client
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def slow_clients(ctx: Ctx) -> Custom:
    """The index and model the server reads are watched too (resolved here, before the snapshot)."""
    index, query = ctx.index, ctx.nets.query
    return Custom(lambda c: stalled_clients_do_not_block_others(c, index, query))


def stalled_clients_do_not_block_others(ctx: Ctx, index: Path, query: Path) -> Outcome:
    """A real `cmpnas serve` (one process): two clients stall (one mid-headers, one mid-body); others
    must still get answers. Timeouts here only stop a hung test; nothing asserts on time."""
    port = free_port()
    cmd = ["serve", "--index", index, "--query-model", query, "--port", port]
    log = ctx.work.parent / "server.log"  # outside the snapshotted folder
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cmpnas.cli", *map(str, cmd)], env=cli_env(), stdout=sink, stderr=sink
        )
    base = f"http://127.0.0.1:{port}"
    stalled: list[socket.socket] = []
    try:
        wait_until_up(proc, base, log)
        stalled.append(socket.create_connection(("127.0.0.1", port)))
        stalled[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # the headers never finish
        stalled.append(socket.create_connection(("127.0.0.1", port)))
        stalled[-1].sendall(
            b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b'Content-Length: 40000\r\n\r\n--b\r\nContent-Disposition: form-data; name="file"; '
            b'filename="q.png"\r\n\r\n\x89PNG'  # the body stops here
        )
        with httpx.Client(base_url=base, timeout=120) as client:
            health = client.get("/healthz")
            image = encode(ctx.fixture("pattern")("checks", 3))
            hits = client.post("/search", params={"k": 3}, files={"file": ("q.png", image, "image/png")})
        assert health.status_code == 200, health.text
        return Outcome(hits.status_code, "", body=hits.json())
    finally:
        for sock in stalled:
            sock.close()
        proc.terminate()
        proc.wait(timeout=60)


def wait_until_up(proc: subprocess.Popen, base: str, log: Path, tries: int = 600) -> None:
    """Poll /healthz until the server answers (a hang guard, not a timing assertion)."""
    for _ in range(tries):
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not come up: {log.read_text(errors='replace')}")


# ------------------------------------------------------------------------------------------- the table
def _cfg(ctx: Ctx, text: str | bytes) -> Cli:
    return Cli(["train-gallery", "-c", ctx.write("bad.yaml", text), "-o", ctx.out])


def _set(section: str, key: str, value: Any) -> Callable[[dict], None]:
    return lambda raw: raw.setdefault(section, {}).__setitem__(key, value)


ROWS: list[Row] = [
    # --- config ------------------------------------------------------------------------------------
    Row("config-yaml-syntax", lambda c: Cli(_cfg(c, "data:\n  name: [folder\n  root: x\n").args, subprocess=True),
        ("bad.yaml", "not valid YAML", "line 3, column 7", "expected ',' or ']'")),
    Row("config-yaml-tab-indent", lambda c: _cfg(c, "data:\n\tname: folder\n"),
        ("bad.yaml", "line 2, column 1", "cannot start any token")),
    Row("config-not-text", lambda c: _cfg(c, b"\x89PNG\r\n\x1a\n\xff\xfe\x00"), ("bad.yaml", "not UTF-8")),
    Row("config-is-a-folder", lambda c: Cli(["train-gallery", "-c", c.work, "-o", c.out]), ("is a folder",)),
    Row("config-not-a-mapping", lambda c: _cfg(c, "- data\n- gallery\n"), ("must hold a mapping",)),
    Row("config-unknown-section", lambda c: train_on(c, cfg=c.config(_set("gallery_trian", "epochs", 1))),
        ("Unknown config key 'gallery_trian'", "rename it to 'gallery_train'")),
    Row("config-unknown-key", lambda c: train_on(c, cfg=c.config(_set("data", "nmae", "folder"))),
        ("Unknown config key 'data.nmae'", "rename it to 'data.name'")),
    Row("config-unknown-key-in-set", lambda c: train_on(c, "query_train.epoch=1"),
        ("'query_train.epoch'", "rename it to 'query_train.epochs'")),
    Row("config-wrong-type", lambda c: train_on(c, cfg=c.config(_set("gallery_train", "epochs", "three"))),
        ("'gallery_train.epochs'", "valid number", "'three'")),
    Row("config-section-not-a-mapping", lambda c: train_on(c, cfg=c.config(lambda r: r.update(data=5))),
        ("'data'", "valid dictionary",)),
    Row("config-budget-two-caps",
        lambda c: train_on(c, cfg=c.config(_set("nas", "budgets", [{"cost_reduction": 40, "macs": 1e6}]))),
        ("'nas.budgets.0'", "give cost_reduction or macs, not both")),
    Row("config-budget-names-clash",
        lambda c: train_on(c, cfg=c.config(_set("nas", "budgets", [{"cost_reduction": 80}, {"macs": 2e6, "name": "80x"}]))),
        ("'nas.budgets'", "two budgets are named '80x'")),
    Row("config-out-of-range", lambda c: train_on(c, "gallery_train.batch_size=0"),
        ("'gallery_train.batch_size'", "greater than or equal to 1")),
    Row("config-set-without-equals", lambda c: train_on(c, "gallery_train"), ("no '='",)),
    Row("config-budget-negative", lambda c: train_on(c, "nas.budget_macs=-5"),
        ("'nas.budget_macs'", "greater than 0")),
    Row("config-budget-below-cheapest-arch",
        lambda c: Cli(["train-supernet", "-g", c.tiny_gallery, "-c", c.config(), "-o", c.out, "--set", "nas.budget_macs=1000"]),
        ("below the cheapest architecture", "raise nas.budget_macs")),
    Row("config-cost-reduction-nothing-fits",
        lambda c: Cli(["train-supernet", "-g", c.tiny_gallery, "-c", c.config(), "-o", c.out,
                       "--set", "nas.budget_cost_reduction=1000000"]),
        ("below the cheapest architecture", "lower nas.budget_cost_reduction")),
    # --- data: image folders -----------------------------------------------------------------------
    Row("data-root-missing", lambda c: folder_data(c, c.work / "nowhere"), ("nowhere", "does not exist")),
    Row("data-root-is-a-file", lambda c: folder_data(c, c.image("x.png")), ("x.png", "is not a folder")),
    Row("data-empty-folder", lambda c: folder_data(c, c.write("empty/.keep", "").parent), ("has no class subfolders",)),
    Row("data-no-images", lambda c: folder_data(c, c.write("docs/a/readme.txt", "hi").parents[1]), ("No images found",)),
    Row("data-corrupt-image", lambda c: bad_image_in(c, "shoe/bad.png", b"%PNG garbage" * 9),
        ("bad.png", "cannot be read", "on_bad_image=skip")),
    Row("data-truncated-image", lambda c: bad_image_in(c, "shoe/cut.jpg", half(encode(Image.new("RGB", (64, 64), "red"), "JPEG"))),
        ("cut.jpg", "truncated")),
    Row("data-zero-byte-image", lambda c: bad_image_in(c, "shoe/zero.png", b""), ("zero.png", "cannot be read")),
    Row("data-decompression-bomb",
        lambda c: Cli(bad_image_in(c, "shoe/bomb.png", png_header_only(10_000, 10_000)).args, subprocess=True),
        ("bomb.png", "100000000 pixels", "decompression bomb")),
    Row("data-image-over-pixel-limit", lambda c: bad_image_in(c, "shoe/big.png", png_header_only(7_000, 7_000)),
        ("big.png", "7000x7000", "40000000-pixel limit", "decompression bomb")),
    Row("data-every-image-unreadable", lambda c: folder_data(c, train_folder(c, ("a/1.png", b"x"), ("b/2.jpg", b""), good=0)),
        ("None of the 2 images could be read",)),
    # --- data: CSV manifests ----------------------------------------------------------------------
    Row("csv-missing-columns", lambda c: csv_data(c, "file,class\na.png,x\n"), ("lacks the column(s) path, label", "header")),
    Row("csv-missing-image-paths", lambda c: csv_data(c, "path,label\ngone/a.png,shirt\ngone/b.png,shoe\n", "data.on_bad_image=error"),
        ("a.png", "file not found")),
    Row("csv-empty-path", lambda c: csv_data(c, "path,label\n,shirt\n"), ("line 2", "the path is empty")),
    Row("csv-header-only", lambda c: csv_data(c, "path,label\n"), ("has a header but no rows",)),
    Row("csv-not-text", lambda c: csv_data(c, b"path,label\n\xff\xfe,x\n"), ("list.csv", "cannot be read", "UTF-8")),
    Row("csv-root-is-a-folder", lambda c: train_on(c, "data.name=csv", root=c.work), ("is a folder",)),
    # --- data: gallery sources of `cmpnas index` --------------------------------------------------
    Row("index-images-missing",
        lambda c: Cli(["index", "--gallery-model", c.nets.gallery, "--images", c.work / "nowhere", "--out", c.work / "idx"]),
        ("nowhere", "does not exist")),
    Row("index-every-image-unreadable",
        lambda c: Cli(["index", "--gallery-model", c.nets.gallery, "--images", c.write("g/a.png", b"junk").parent,
                       "--out", c.work / "idx"]),
        ("None of the gallery images could be read", "a.png")),
    Row("index-out-parent-is-a-file",
        lambda c: Cli(["index", "--gallery-model", c.nets.gallery, "--images", c.image("g/a.png").parent,
                       "--out", c.write("afile", "x") / "idx"]),
        ("afile", "is a file, not a folder")),
    Row("index-uri-without-milvus",
        lambda c: Cli(["index", "--gallery-model", c.nets.gallery, "--images", c.image("g/a.png").parent,
                       "--out", c.work / "idx", "--uri", c.work / "a.db"]),
        ("--uri and --collection are Milvus settings", "--backend milvus")),
    Row("evaluate-index-no-query-source",
        lambda c: Cli(["evaluate-index", "--index", c.work / "idx", "--query-model", c.nets.query]),
        ("exactly one query source", "--images DIR")),
    Row("index-cmyk-and-16bit-accepted", cmyk_and_16bit_folder, (), status=0, accepted=True,
        check=indexed_like_their_8bit_twins),
    # --- models -----------------------------------------------------------------------------------
    Row("model-text-file", lambda c: Cli(["export", "--model", c.write("notes.txt", "not a model\n"), "--out", c.work / "q.onnx"]),
        ("notes.txt", "not a readable safetensors model")),
    Row("model-random-bytes",
        lambda c: Cli(["train-query", "-g", c.write("random.safetensors", os.urandom(4096)), "-c", c.config(), "-o", c.out],
                      subprocess=True),
        ("random.safetensors",)),
    Row("model-truncated",
        lambda c: Cli(["export", "--model", c.write("cut.safetensors", half(c.nets.gallery.read_bytes())), "--out", c.work / "q.onnx"]),
        ("cut.safetensors", "not a readable safetensors model")),
    Row("model-plain-safetensors", lambda c: Cli(["export", "--model", plain_safetensors(c), "--out", c.work / "q.onnx"]),
        ("plain.safetensors", "not a cmpnas model")),
    Row("model-spec-weights-mismatch",
        lambda c: Cli(["export", "--model",
                       save_raw_model(c.work / "mixed.safetensors", tiny_net([4, 8]).state_dict(), tiny_net([8, 16]).spec.to_json()),
                       "--out", c.work / "q.onnx"]),
        ("mixed.safetensors", "do not match their spec", "of another shape", "another architecture")),
    Row("model-spec-damaged",
        lambda c: Cli(["export", "--model", save_raw_model(c.work / "m.safetensors", tiny_net([4, 8]).state_dict(), "{not json"),
                       "--out", c.work / "q.onnx"]),
        ("m.safetensors", "model spec stored in", "unreadable")),
    Row("model-pair-embed-dims-differ",
        lambda c: Cli(["query", "--index", c.index, "--query-model", c.nets.wide, c.image("q.png")]),
        ("embeds into 32 dims", "16-dim")),
    Row("model-pair-dims-differ-in-evaluate",
        lambda c: Cli(["evaluate", "-g", c.nets.gallery, "--query", c.nets.wide, "-c", c.config(), "-o", c.out]),
        ("embed_dim 32 != gallery embed_dim 16",)),
    Row("model-pair-not-compatible",
        lambda c: Cli(["query", "--index", c.index, "--query-model", c.nets.stranger, c.image("q.png")]),
        ("not comparable", "--allow-incompatible")),
    Row("model-onnx-random-bytes",
        lambda c: Cli(["query", "--index", c.index, "--query-model", c.write("q.onnx", os.urandom(512)), c.image("q.png")]),
        ("q.onnx", "not a loadable ONNX model")),
    Row("query-image-not-an-image",
        lambda c: Cli(["query", "--index", c.index, "--query-model", c.nets.query, c.write("q.png", "plain text\n")]),
        ("Cannot read query image", "q.png")),
    Row("query-k-zero",
        lambda c: Cli(["query", "--index", c.index, "--query-model", c.nets.query, "-k", "0", c.image("q.png")], subprocess=True),
        ("'-k'", "greater than or equal to 1", "cmpnas query --help")),
    Row("serve-index-missing",
        lambda c: Cli(["serve", "--index", c.work / "nowhere", "--query-model", c.nets.query], subprocess=True),
        ("nowhere", "not a gallery index")),
    Row("serve-two-models-one-name",
        lambda c: Cli(["serve", "--index", c.index, "--query-model", c.nets.query, "--query-model", c.write("query.onnx", "x")],
                      subprocess=True),
        ("both named 'query'", "rename one file")),
    Row("serve-family-member-without-model",
        lambda c: Cli(["serve", "--index", c.index, "--query-model",
                       c.write("fam/family.json", json.dumps({"members": [{"name": "80x", "macs": 1}]})).parent],
                      subprocess=True),
        ("Member '80x'", "neither 'onnx' nor 'model'")),
    # --- export -----------------------------------------------------------------------------------
    Row("export-out-parent-is-a-file",
        lambda c: Cli(["export", "--model", c.nets.query, "--out", c.write("afile", "x") / "q.onnx"], subprocess=True),
        ("afile", "is a file, not a folder")),
    Row("export-out-is-a-folder",
        lambda c: Cli(["export", "--model", c.nets.query, "--out", c.write("q.onnx/.keep", "").parent]),
        ("is an existing folder",)),
    Row("export-out-not-onnx", lambda c: Cli(["export", "--model", c.nets.query, "--out", c.work / "q.txt"]),
        ("does not end in .onnx",)),
    Row("export-model-and-family",
        lambda c: Cli(["export", "--model", c.nets.query, "--family", c.work, "--out", c.work / "exported"]),
        ("exactly one of --model and --family",)),
    Row("export-family-not-retrained",
        lambda c: Cli(["export", "--family", c.write("fam/family.json", json.dumps(
            {"format": "cmpnas.family.v1", "members": [{"name": "80x", "arch": {"blocks": [0], "scales": [1.0]}}]})),
            "--out", c.work / "exported"], subprocess=True),
        ("Family member '80x' has no trained model", "cmpnas retrain --family")),
    # --- protocols --------------------------------------------------------------------------------
    Row("df2-json-syntax", lambda c: df2_eval(c, lambda f: f.annotation_path(1).write_text('{"source": "user",')),
        ("000001.json", "not valid JSON")),
    Row("df2-json-not-an-object", lambda c: df2_eval(c, lambda f: f.annotation_path(1).write_text("[1, 2]")),
        ("000001.json", "not a JSON object")),
    Row("df2-missing-bounding-box", lambda c: df2_eval(c, lambda f: edit_annotation(f, lambda r: r["item1"].pop("bounding_box"))),
        ("000001.json", "item1", "bounding_box None")),
    Row("df2-missing-source", lambda c: df2_eval(c, lambda f: edit_annotation(f, lambda r: r.pop("source"))),
        ("000001.json", "'source' is None")),
    Row("df2-image-missing", lambda c: df2_eval(c, lambda f: (f.root / "validation/image/000002.jpg").unlink()),
        ("000002.jpg", "restore the image")),
    Row("ijbc-tid-mid-missing-column", lambda c: ijbc_eval(c, drop_column("ijbc_face_tid_mid.txt")),
        ("ijbc_face_tid_mid.txt", "line 1", "2 columns instead of 3")),
    Row("ijbc-5pts-missing-column", lambda c: ijbc_eval(c, drop_column("ijbc_name_5pts_score.txt", 2)),
        ("ijbc_name_5pts_score.txt", "line 3", "11 columns instead of 12")),
    Row("ijbc-pairs-missing-column", lambda c: ijbc_eval(c, drop_column("ijbc_template_pair_label.txt", 1)),
        ("ijbc_template_pair_label.txt", "line 2", "2 columns instead of 3")),
    Row("ijbc-meta-file-missing", lambda c: ijbc_eval(c, lambda f: (f.meta_dir / "ijbc_template_pair_label.txt").unlink()),
        ("ijbc_template_pair_label.txt", "not found")),
    Row("npz-without-ids", lambda c: df2_eval(c, ids=lambda ids: None), ("has no array 'ids'",)),
    Row("npz-without-embeddings", lambda c: df2_eval(c, embeddings=lambda ids: None), ("has no array 'embeddings'",)),
    Row("npz-nan-embeddings", lambda c: Cli(df2_eval(c, embeddings=with_value(np.nan)).args, subprocess=True),
        ("1 row(s) of 'embeddings' contain NaN or infinite",)),
    Row("npz-inf-embeddings", lambda c: ijbc_eval(c, embeddings_flip=with_value(np.inf, 2)),
        ("'embeddings_flip' contain NaN or infinite",)),
    Row("npz-not-an-archive", lambda c: df2_eval(c, npz_file=lambda c, ids: c.write("e.npz", "ids,emb\n")),
        ("e.npz", "not an .npz archive"), absent=("pickle",)),
    Row("npz-ids-missing", lambda c: df2_eval(c, npz_file=lambda c, ids: npz(c, ids[1:], "few.npz")),
        ("1 required id(s) have no embedding",)),
    # --- service ----------------------------------------------------------------------------------
    Row("upload-not-an-image", lambda c: upload(b"hello, I am a text file\n" * 10, "text/plain"),
        ("Not a supported image",), status=415),
    Row("upload-postscript", lambda c: upload(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n", "application/postscript"),
        ("Not a supported image",), status=415),
    Row("upload-empty-file", lambda c: upload(b""), ("empty",), status=400),
    Row("upload-truncated-png", lambda c: upload(half(encode(c.fixture("pattern")("checks", 1)))), ("corrupt",), status=400),
    Row("upload-decompression-bomb", lambda c: upload(png_header_only(100_000, 100_000)), ("pixels",), status=413),
    Row("upload-too-many-pixels", lambda c: upload(encode(Image.new("L", (1200, 1000)))), ("1200x1000",), status=413),
    Row("upload-oversized-body", lambda c: upload(b"\0" * (4 * MAX_UPLOAD)), ("larger than",), status=413),
    Row("upload-oversized-chunked-body", lambda c: oversized_chunked_body(), ("larger than",), status=413),
    Row("upload-k-zero", lambda c: upload(encode(c.fixture("pattern")("blobs", 2)), k=0), (f"between 1 and {MAX_K}",), status=422),
    Row("upload-k-negative", lambda c: upload(encode(c.fixture("pattern")("blobs", 2)), k=-3), ("(got -3)",), status=422),
    Row("upload-k-huge", lambda c: upload(encode(c.fixture("pattern")("blobs", 2)), k=10**12), (f"between 1 and {MAX_K}",),
        status=422),
    Row("upload-k-not-a-number", lambda c: upload(encode(c.fixture("pattern")("blobs", 2)), k="ten"),
        ("k must be an integer", "'ten'"), status=422),
    Row("upload-missing-file-field", lambda c: Http(data={"k": "3"}), ("Field 'file'", "multipart"), status=422),
    Row("upload-unknown-query-model", lambda c: upload(encode(c.fixture("pattern")("blobs", 2)), model="nope"),
        ("Unknown query model 'nope'", "available: query"), status=422),
    Row("upload-wrong-field-name", lambda c: Http(files={"image": ("q", encode(c.fixture("pattern")("blobs", 2)), "image/png")}),
        ("Field 'file'",), status=422),
    Row("upload-cmyk-jpeg-accepted", lambda c: upload(encode(cmyk_image(), "JPEG"), "image/jpeg", k=3), (), status=200,
        accepted=True, check=has_hits(3)),
    Row("upload-16bit-png-accepted", lambda c: upload(encode(grey_pair()[1]), k=5), (), status=200, accepted=True,
        check=same_hits_as_8bit),
    Row("upload-slow-clients", slow_clients, (), status=200, accepted=True,
        check=has_hits(3)),
]  # fmt: skip


# ------------------------------------------------------------------------------------------- running
def cli_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_cli(call: Cli, capsys: pytest.CaptureFixture[str]) -> Outcome:
    args = [str(a) for a in call.args]
    if call.subprocess:
        proc = subprocess.run(
            [sys.executable, "-m", "cmpnas.cli", *args],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=600,
        )
        return Outcome(proc.returncode, proc.stderr, proc.stdout)
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Outcome(code, captured.err, captured.out)


def run_http(call: Http, client: TestClient) -> Outcome:
    r = client.post(
        "/search",
        files=call.files,
        params=call.params,
        data=call.data,
        content=call.content,
        headers=call.headers,
    )
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    message = body.get("detail") if r.status_code >= 400 else ""
    return Outcome(r.status_code, message, body=body)


def snapshot(folders: list[Path]) -> dict[str, tuple[str, int, int, str]]:
    """Every file and folder under ``folders``: kind, size, mtime and content hash."""
    state: dict[str, tuple[str, int, int, str]] = {}
    for root in dict.fromkeys(folders):
        for path in [root, *sorted(root.rglob("*"))]:
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            state[str(path)] = ("dir" if path.is_dir() else "file", st.st_size, st.st_mtime_ns, digest)
    return state


@pytest.fixture(scope="module")
def service(flat_index: Path, models: Models) -> TestClient:  # noqa: F811 (the imported fixtures)
    app = create_app(
        flat_index, models.query, max_upload_bytes=MAX_UPLOAD, max_k=MAX_K, max_pixels=MAX_PIXELS
    )
    return TestClient(app)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, request: pytest.FixtureRequest, tmp_path: Path, capsys) -> None:
    ctx = Ctx(tmp_path / "work", request)
    ctx.work.mkdir()
    ctx.watched.append(ctx.work)
    call = row.make(ctx)
    before = snapshot(ctx.watched)
    if isinstance(call, Cli):
        outcome = run_cli(call, capsys)
    elif isinstance(call, Http):
        outcome = run_http(call, ctx.fixture("service"))
    else:
        outcome = call.run(ctx)
    assert outcome.code == row.status, outcome
    if not row.accepted:
        assert_names_problem_and_fix(call, outcome, row.expect)
        assert not [f for f in row.absent if f in outcome.message], outcome.message
    if row.check is not None:
        row.check(ctx, outcome)
    assert snapshot(ctx.watched) == before, "the command changed files on disk"


def assert_names_problem_and_fix(
    call: Cli | Http | Custom, outcome: Outcome, expect: tuple[str, ...]
) -> None:
    message = outcome.message
    if isinstance(call, Cli):
        lines = message.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got:\n{message}"
        assert lines[0].startswith("cmpnas: error: ") and "Traceback" not in message, message
        problem, _, fix = lines[0].partition(" Fix: ")
        assert problem and fix.strip(), f"no 'Fix:' part: {lines[0]}"
        message = lines[0]
    else:
        assert isinstance(message, str) and message, outcome.body
    for fragment in expect:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_the_table_is_large_and_its_ids_unique() -> None:
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids))
    assert sum(not row.accepted for row in ROWS) >= 40
    assert sum(row.accepted for row in ROWS) >= 3


def test_every_row_is_documented() -> None:
    """docs/reliability.md's bad-input section has one table line per row (and none for a row that is gone)."""
    section = DOC.read_text().split(DOC_SECTION, 1)[1]
    documented = {
        line.split("|")[-2].strip().strip("`")
        for line in section.splitlines()
        if line.startswith("| ")
    } - {"test id", "---"}
    assert documented == {row.id for row in ROWS}


def test_the_good_inputs_the_rows_break_are_accepted(
    request: pytest.FixtureRequest, tmp_path: Path, capsys
) -> None:
    """The unbroken config and protocol fixtures pass, so each row fails because of its one bad input."""
    for name, make in (("df2", df2_eval), ("ijbc", ijbc_eval)):
        ctx = Ctx(tmp_path / name, request)
        ctx.work.mkdir()
        outcome = run_cli(make(ctx), capsys)  # type: ignore[operator]
        assert outcome.code == 0, outcome.message
        assert (ctx.out / "results.json").is_file()
    ctx = Ctx(tmp_path / "cfg", request)
    assert run_cli(Cli(["train-gallery", "-c", ctx.config(), "-o", ctx.out, "--set", "gallery_train.epochs=0.1"]),
                   capsys).code == 0  # fmt: skip
