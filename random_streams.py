"""A run's random streams: the generators it draws from, kept per run so that runs of a group draw exactly what
their solo runs would, saved in last.pt, and restored (or reseeded, between the CPU and a GPU) on --resume.

A run draws from its data generator (batch order, crops, flips; on the run's device) and from torch's global
generators: the CPU's (initial weights) and, on a GPU, that GPU's default one (CRD's negatives). Each run of a group
keeps its own copy of the global generators' state, swapped in around everything it does, so that its stream is
the one its solo run would see. last.pt records all of them with the device they were drawn on; no other GPU's
state, which means nothing to this run and which another machine may lack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

RESEED_STRIDE = 1_000_003  # a stream reseeded on resume starts from --seed + this x the epochs done


def resume_seed(seed: int, epochs_done: int) -> int:
    """The seed of a stream that cannot carry over on resume: one stream per epoch resumed at, none of them the
    stream the run started from (which would replay the first epoch's batch order, crops and flips)."""
    return seed + RESEED_STRIDE * epochs_done


def global_generators(device: torch.device) -> dict[str, torch.Generator]:
    """torch's CPU generator and, on a GPU, that GPU's default generator, by their last.pt keys."""
    generators = {"torch_rng": torch.default_generator}
    if device.type == "cuda":
        torch.cuda.init()
        index = torch.cuda.current_device() if device.index is None else device.index
        generators["device_rng"] = torch.cuda.default_generators[index]
    return generators


def run_generators(data: torch.Generator) -> dict[str, torch.Generator]:
    """Every generator a run draws from, by its last.pt key: its data generator and the global ones of its device."""
    return {"data_rng": data, **global_generators(data.device)}


def capture_random_streams(device: torch.device) -> dict[str, Tensor]:
    """The global generators' state on `device`, as last.pt records it."""
    return {key: generator.get_state() for key, generator in global_generators(device).items()}


def restore_random_streams(streams: dict[str, Tensor], device: torch.device) -> None:
    """Set the global generators to a state from `capture_random_streams`."""
    for key, generator in global_generators(device).items():
        generator.set_state(streams[key])


def save_random_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The run's random state for last.pt, with the device it was drawn on."""
    return {"rng_device": str(generators["data_rng"].device), **{k: g.get_state() for k, g in generators.items()}}


def restore_random_state(saved: dict[str, Any], generators: dict[str, torch.Generator], reseed: int,
                         log: Callable[[str], None]) -> None:
    """Continue the saved random stream where it carries over; else reseed it, with a one-line notice.

    torch's CPU generator always carries over. A GPU generator's state (a seed and an offset) means the same on any
    GPU, so a run resumed on another GPU index continues its stream exactly; a CPU generator's (a Mersenne Twister)
    cannot become a GPU's or back, so a run moved between the CPU and a GPU continues with the data and device
    generators reseeded from `reseed`. A last.pt from before the device was recorded counts as the CPU's (every run
    until then was); a state of another size than this torch's generator holds is reseeded, never a traceback.
    """
    generators["torch_rng"].set_state(saved["torch_rng"])
    saved_on, device = torch.device(saved.get("rng_device", "cpu")), generators["data_rng"].device
    drawn = {key: generator for key, generator in generators.items() if key != "torch_rng"}
    if saved_on.type == device.type and all(
            isinstance(saved.get(key), Tensor) and saved[key].numel() == g.get_state().numel()
            for key, g in drawn.items()):
        for key, generator in drawn.items():
            generator.set_state(saved[key])
        return
    for generator in drawn.values():
        generator.manual_seed(reseed)
    log(f"--resume: this run was interrupted on {saved_on}, it continues on {device}; its random stream (batch order, "
        "crops, flips, CRD's negatives) cannot carry over and is reseeded from --seed and the epoch, so the result "
        "will differ from an uninterrupted run's")
