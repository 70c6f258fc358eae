"""torchrun, 2 CPU processes (gloo): the CLI trains, only rank 0 writes, supernet paths agree across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from cmpnas.models.embedding import load_model

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**_env(), "TMPDIR": str(cwd)}  # torchrun's log folders (torchelastic_*) stay in the test's folder
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


def test_train_gallery_under_torchrun_only_rank0_writes(tmp_path: Path, tiny_raw: dict, tiny_train) -> None:
    raw = tiny_raw
    # 250 training images, global batch 15: 7 per rank -> 125 // 7 = 17 steps under DDP (16 in one process)
    raw["data"] = {"name": "synthetic", "subset_train": 300, "subset_test": 60, "val_size": 50}
    raw["gallery_train"] = tiny_train(epochs=1, batch_size=15, log_every=4)
    n_train, batch = 250, 15
    ddp_steps = (n_train // 2) // (batch // 2)
    assert ddp_steps != n_train // batch  # so the step count proves that two ranks shared the epoch
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "gallery"

    _run([*TORCHRUN, "-m", "cmpnas.cli", "train-gallery", "-c", str(cfg_path), "-o", str(out)], tmp_path)

    names = sorted(p.name for p in out.iterdir())
    assert {"checkpoint.pt", "config.yaml", "manifest.json", "metrics.jsonl", "model.safetensors"} <= set(
        names
    )
    assert [n for n in names if n.endswith(".safetensors")] == ["model.safetensors"]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), "metrics were written by more than one rank"
    assert steps[-1] == ddp_steps
    assert steps == [s for s in range(1, ddp_steps + 1) if s % 4 == 0 or s == ddp_steps]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["train"]["steps"] == ddp_steps
    assert load_model(out / "model.safetensors").spec.embed_dim == raw["gallery"]["embed_dim"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


RECORD_PATHS = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch

    from cmpnas.config import build_config
    from cmpnas.models.spaces.spos import SposSpace
    from cmpnas.stages import train_supernet

    torch.set_num_threads(1)
    out, gallery, cfg_file = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    cfg = build_config(json.loads(cfg_file.read_text()))
    real_sampler = SposSpace.path_sampler
    log = []

    def recording_sampler(space, *args, **kwargs):
        sample = real_sampler(space, *args, **kwargs)

        def sample_and_record(step):
            arch = sample(step)
            log.append([step, space.arch_key(arch)])
            return arch

        return sample_and_record

    SposSpace.path_sampler = recording_sampler
    train_supernet(cfg, gallery, out / "supernet")
    (out / "paths").mkdir(exist_ok=True)
    (out / "paths" / f"rank{os.environ['RANK']}.json").write_text(json.dumps(log))
    """
)


def test_supernet_samples_the_same_path_on_both_ranks(
    tmp_path: Path, tiny_gallery: Path, tiny_raw: dict, tiny_train
) -> None:
    raw = tiny_raw
    raw["nas"]["supernet_train"] = tiny_train(epochs=2)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(raw))
    script = tmp_path / "record_paths.py"
    script.write_text(RECORD_PATHS)

    _run([*TORCHRUN, str(script), str(tmp_path), str(tiny_gallery), str(cfg_file)], tmp_path)

    logs = [json.loads((tmp_path / "paths" / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = 2 * ((250 // 2) // (50 // 2))
    assert [s for s, _ in logs[0]] == list(range(total))
    assert logs[0] == logs[1]
    assert len({key for _, key in logs[0]}) > 1  # paths do change from step to step
    supernet_files = sorted(p.name for p in (tmp_path / "supernet").iterdir())
    assert supernet_files.count("supernet.safetensors") == 1
    assert "metrics.jsonl" in supernet_files


def test_path_sampler_depends_only_on_seed_and_step(tiny_raw: dict) -> None:
    """In-process companion: separately built samplers (as on separate ranks) agree step by step."""
    import random

    from cmpnas.models.spaces.spos import SposSpace

    space = SposSpace(tiny_raw["nas"]["space"], in_chans=1, input_size=28)
    lo, hi = space.min_macs(), space.max_macs()
    samplers = [space.path_sampler(7, lo + 0.3 * (hi - lo), hi, 16) for _ in range(2)]
    for step in (0, 1, 5, 1000):
        keys = {space.arch_key(s(step)) for s in samplers}
        assert len(keys) == 1
    other_seed = space.path_sampler(8, None, None, 16)
    same_seed = space.path_sampler(7, None, None, 16)
    assert [space.arch_key(same_seed(s)) for s in range(20)] != [
        space.arch_key(other_seed(s)) for s in range(20)
    ]
    random.seed(0)  # the global RNG must not matter
    a = [space.arch_key(same_seed(s)) for s in range(5)]
    random.seed(1)
    assert a == [space.arch_key(same_seed(s)) for s in range(5)]


RANK_WEIGHTS = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from pathlib import Path

    import torch

    from cmpnas.config import build_config
    from cmpnas.data.factory import build_data
    from cmpnas.models.embedding import EmbeddingModel
    from cmpnas.stages.common import make_spec
    from cmpnas.training.loop import train
    from cmpnas.training.tasks import ClassificationTask

    torch.set_num_threads(1)
    out, cfg_file = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = build_config(json.loads(cfg_file.read_text()))
    data = build_data(cfg.data)
    torch.manual_seed(int(os.environ["RANK"]))  # different initial weights: DDP must sync them from rank 0
    model = EmbeddingModel(make_spec(cfg.gallery, data, "gallery"))
    train(ClassificationTask(model), data.train, cfg.gallery_train, out / "run", mean=data.mean, std=data.std)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    (out / f"weights{os.environ['RANK']}.txt").write_text(digest.hexdigest())
    """
)


def test_ranks_hold_identical_parameters_after_training(tmp_path: Path, tiny_raw: dict, tiny_train) -> None:
    tiny_raw["gallery_train"] = tiny_train(epochs=1, batch_size=20)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(tiny_raw))
    script = tmp_path / "rank_weights.py"
    script.write_text(RANK_WEIGHTS)

    _run([*TORCHRUN, str(script), str(tmp_path), str(cfg_file)], tmp_path)

    digests = [(tmp_path / f"weights{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
