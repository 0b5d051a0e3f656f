"""Resume across devices, on the CPU: last.pt states written the way a CUDA run writes them, resumed elsewhere.

A CUDA run saves its data generator's and its own GPU's default generator's state: torch documents a CUDA
generator's state as 16 bytes, a 64-bit seed then a 64-bit Philox offset (`torch.cuda.get_rng_state`), where a
CPU generator's is 5056 bytes (Mersenne Twister). Those are fabricated here, byte for byte. Where the run device
itself must be a GPU, `FakeCudaGenerator` stands in for torch's CUDA generator with its documented behaviour (that
16-byte state; `set_state` refusing a state of another size, as torch does with "RNG state is wrong size").
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import FakeCuda

import engine
from cuda_graphs import WARMUP_STEPS, GraphedStep
from data import from_arrays, make_synthetic
from engine import TrainConfig, fit
from models import build_model
from random_streams import restore_random_state, run_generators, save_random_state
from stages import TeacherTraining

CUDA_STATE_BYTES = 16  # int64 seed, int64 offset


def philox_state(seed: int, offset: int) -> torch.Tensor:
    """A CUDA generator's state as torch.cuda.get_rng_state returns it."""
    return torch.tensor([seed, offset], dtype=torch.int64).view(torch.uint8)


class FakeCudaGenerator:
    """torch's CUDA generator as documented: a (seed, offset) state of 16 bytes, refused at any other size."""

    def __init__(self, device: str, seed: int = 0, offset: int = 0):
        self.device = torch.device(device)
        self.state = philox_state(seed, offset)

    def get_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_state(self, state: torch.Tensor) -> None:
        if state.numel() != CUDA_STATE_BYTES:
            raise RuntimeError("RNG state is wrong size")
        self.state = state.clone()

    def manual_seed(self, seed: int) -> FakeCudaGenerator:
        self.state = philox_state(seed, 0)
        return self


def generators_on(device: str, seed: int) -> dict:
    """A run's generators on `device` (run_generators' keys); torch's CPU generator is a private one here."""
    cpu = torch.Generator().manual_seed(seed + 1)
    if device == "cpu":
        return {"data_rng": torch.Generator().manual_seed(seed), "torch_rng": cpu}
    return {"data_rng": FakeCudaGenerator(device, seed, 4 * seed), "torch_rng": cpu,
            "device_rng": FakeCudaGenerator(device, seed + 2, 8 * seed)}


def states(generators: dict) -> dict[str, torch.Tensor]:
    return {key: g.get_state() for key, g in generators.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("written_on", "resumed_on", "carries"), [
    ("cpu", "cpu", True),
    ("cuda:0", "cuda:0", True),
    ("cuda:1", "cuda:0", True),  # a GPU's (seed, offset) means the same on any GPU: the stream continues
    ("cuda:3", "cuda:0", True),  # written with 4 GPUs visible, resumed with 1: only the run's own state was saved
    ("cpu", "cuda:0", False),
    ("cuda:1", "cpu", False),
])
def test_random_state_carries_over_or_is_reseeded_with_one_notice(written_on, resumed_on, carries):
    saved = save_random_state(generators_on(written_on, seed=7))
    assert saved["rng_device"] == written_on
    assert saved["data_rng"].numel() == (5056 if written_on == "cpu" else CUDA_STATE_BYTES)
    generators, notices = generators_on(resumed_on, seed=99), []
    restore_random_state(saved, generators, reseed=1234, log=notices.append)
    assert torch.equal(generators["torch_rng"].get_state(), saved["torch_rng"])  # always carries over
    drawn = {key: state for key, state in states(generators).items() if key != "torch_rng"}
    if carries:
        assert same(drawn, {key: saved[key] for key in drawn}) and notices == []
    else:
        reseeded = {key: g.manual_seed(1234).get_state() for key, g in generators_on(resumed_on, seed=0).items()
                    if key != "torch_rng"}
        assert same(drawn, reseeded)
        assert len(notices) == 1 and "\n" not in notices[0]
        assert f"interrupted on {written_on}, it continues on {resumed_on}" in notices[0] and "reseeded" in notices[0]


@pytest.mark.parametrize("resumed_on", ["cpu", "cuda:0"])
def test_a_last_pt_from_before_the_device_was_recorded(resumed_on):
    """Old last.pt files had no `rng_device` and every visible GPU's state in `cuda_rng`: a CPU run's (no GPU
    states) continues on the CPU exactly; one from a GPU machine (4 GPU states) is reseeded, never an IndexError."""
    cpu = generators_on("cpu", seed=5)
    old_cpu = {"data_rng": cpu["data_rng"].get_state(), "torch_rng": cpu["torch_rng"].get_state(), "cuda_rng": []}
    old_gpu = {"data_rng": philox_state(5, 40), "torch_rng": cpu["torch_rng"].get_state(),
               "cuda_rng": [philox_state(i, 0) for i in range(4)]}
    for old, carries in ((old_cpu, resumed_on == "cpu"), (old_gpu, False)):
        generators, notices = generators_on(resumed_on, seed=99), []
        restore_random_state(old, generators, reseed=1, log=notices.append)
        assert torch.equal(generators["data_rng"].get_state(), old["data_rng"]) == carries
        assert len(notices) == (0 if carries else 1)


def test_run_generators_on_the_cpu_are_the_data_generator_and_torchs():
    data = torch.Generator().manual_seed(3)
    generators = run_generators(data)
    assert generators == {"data_rng": data, "torch_rng": torch.default_generator}


# ------------------------------------------------------------------------------------- through fit


def tiny_data(n: int = 40):
    x_train, y_train, x_test, y_test = make_synthetic(n, 20, seed=0)
    return from_arrays(x_train[:, ::2, ::2].copy(), y_train, x_test[:, ::2, ::2].copy(), y_test, torch.device("cpu"))


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "wd": 5e-4, "nesterov": True,
                          "schedule": (1,), "gamma": 0.1, "seed": 3, **overrides})


def train(out, data, resume: bool = False, cfg: TrainConfig | None = None) -> tuple[dict, list[str]]:
    torch.manual_seed(0)
    lines: list[str] = []
    summary = fit(TeacherTraining(build_model("res8", 10), "res8"), data, cfg or config(), out, {"model": "res8"},
                  resume=resume, log=lines.append)
    return summary, lines


def as_a_cuda_run_writes_it(path, writer: str) -> None:
    """Replace last.pt's random state by one a CUDA run on `writer` writes (or, "old-gpu", the format before the
    device was recorded, from a 4-GPU machine)."""
    ckpt = torch.load(path, weights_only=True)
    for key in ("rng_device", "data_rng", "device_rng"):
        ckpt.pop(key, None)
    if writer == "old-gpu":
        ckpt |= {"data_rng": philox_state(3, 1024), "cuda_rng": [philox_state(i, 64) for i in range(4)]}
    else:
        ckpt |= {"rng_device": writer, "data_rng": philox_state(3, 1024), "device_rng": philox_state(3, 64)}
    torch.save(ckpt, path)


@pytest.mark.parametrize("writer", ["cuda:1", "old-gpu"])
def test_a_gpu_runs_last_pt_resumes_on_the_cpu_with_one_notice(tmp_path, writer):
    """Killed after epoch 1 on a GPU (its last.pt), resumed on the CPU: one notice line, epoch 1 kept as it was,
    epoch 2 trained once; the reseeded stream is a function of the seed and the epoch, so two such resumes agree."""
    data = tiny_data()
    cut = tmp_path / "cut"
    train(cut, data, cfg=config(epochs=1))
    (cut / "summary.json").unlink()  # as if killed after epoch 1 of 2
    shutil.copy(cut / "metrics.jsonl", tmp_path / "before.jsonl")
    as_a_cuda_run_writes_it(cut / "last.pt", writer)
    # (epochs=1 vs 2 is not an argument fit compares: `args` holds the model only.)
    shutil.copytree(cut, tmp_path / "again")
    summary, lines = train(cut, data, resume=True)
    notices = [line for line in lines if "reseeded" in line]
    assert len(notices) == 1 and f"interrupted on {'cpu' if writer == 'old-gpu' else writer}" in notices[0], lines
    assert f"resuming {cut} after epoch 1" in lines
    trained = [line for line in lines if line.startswith("epoch")]
    assert len(trained) == 1 and trained[0].startswith("epoch   2/2"), lines  # epoch 1 was not trained again
    rows = (cut / "metrics.jsonl").read_text().splitlines()
    assert rows[0] == (tmp_path / "before.jsonl").read_text().splitlines()[0] and len(rows) == 2
    assert json.loads(rows[1])["epoch"] == 2 and summary["epochs"] == 2
    train(tmp_path / "again", data, resume=True)
    a, b = (torch.load(p / "teacher.pt", weights_only=True)["state_dict"] for p in (cut, tmp_path / "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_reseeded_stream_does_not_replay_the_first_epoch(tmp_path, monkeypatch):
    """The stream reseeded when a run moves between a GPU and the CPU starts from --seed and the epochs done, never
    from --seed alone: that is the stream the run started from, and epoch 2 would draw epoch 1's batches again (the
    same order, crops and flips)."""
    orders: list[list[list[int]]] = []
    real = engine.train_batches

    def recorded(*args, **kwargs):
        orders.append([])
        for batch in real(*args, **kwargs):
            orders[-1].append(batch.index.tolist())
            yield batch

    monkeypatch.setattr(engine, "train_batches", recorded)
    data = tiny_data()
    train(tmp_path, data, cfg=config(epochs=1))
    (tmp_path / "summary.json").unlink()  # as if killed after epoch 1 of 2, on a GPU
    as_a_cuda_run_writes_it(tmp_path / "last.pt", "cuda:0")
    _, lines = train(tmp_path, data, resume=True)
    assert any("reseeded" in line for line in lines)
    first, resumed = orders
    assert len(first) == len(resumed) == 3 and resumed != first


# ----------------------------------------------------------------------- CUDA-graph counts, recorded


def test_fit_records_warmups_captures_and_replays_per_epoch_and_in_the_summary(tmp_path, monkeypatch):
    """What the GPU check reads to prove that graphs ran: per epoch in metrics.jsonl, summed in summary.json
    (CUDA faked, as in test_execution: bookkeeping only). 40 images in batches of 16: a full and a partial shape,
    each warmed up twice before its capture; the LR drops after epoch 1, which recaptures."""
    class Faked(GraphedStep):
        def __init__(self, step, optimizer):
            fake = FakeCuda(optimizer)
            super().__init__(step, optimizer, warm=fake.warm, capture=fake.capture)

    monkeypatch.setattr(engine, "GraphedStep", Faked)
    summary, _ = train(tmp_path, tiny_data(), cfg=config(cuda_graphs=True))
    rows = [json.loads(line)["cuda_graphs"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert WARMUP_STEPS == 2
    # Epoch 1, shapes 16, 16, 8: warm, warm, warm. Epoch 2 (new LR): capture and replay, replay, warm.
    assert rows == [{"steps": 3, "warmups": 3, "captures": 0, "replays": 0},
                    {"steps": 3, "warmups": 1, "captures": 1, "replays": 2}]
    assert summary["cuda_graphs"] == {"steps": 6, "warmups": 4, "captures": 1, "replays": 2}
