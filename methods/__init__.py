"""The student methods of the paper's comparison, one file each, all plug-ins of the one engine.

    ce       labels only                                         methods/ce.py
    kd       the teacher's softened logits                       methods/kd.py
    fitnets  stage-1 feature maps (hint phase), then KD          methods/fitnets.py
    takd     KD through a teacher assistant                      methods/takd.py
    at       attention maps of paired stages                     methods/at.py
    crd      penultimate features, contrasted (memory banks)     methods/crd.py
    tofd     aux classifiers' pooled features and logits         methods/tofd.py  (teacher: train_teacher.py --tofd)
    mhkd     logits of conv heads on taps 1-2 of both networks   methods/mhkd.py  (teacher heads trained in the run)
    dih      the teacher's classifier + its k heads, at once     methods/dih.py
    dkd      target / non-target classes of KD apart (DKD)       methods/dkd.py   (not in the paper: the
             logit method later comparisons are made against)

`METHODS` maps each name to its `Method` record; `run_name` is the folder name a student run gets.
"""

from __future__ import annotations

from typing import Any

from . import at, ce, crd, dih, dkd, fitnets, kd, mhkd, takd, tofd
from .base import HYPERS, Hyper, Method, Setup, StudentStage, TeacherOutputs, TeacherPass

__all__ = ["HYPERS", "METHODS", "Hyper", "Method", "Setup", "StudentStage", "TeacherOutputs", "TeacherPass",
           "run_name"]

# In the order of the paper's comparison table, then DKD (which came after the paper).
METHODS: dict[str, Method] = {
    module.METHOD.name: module.METHOD for module in (ce, kd, fitnets, takd, at, crd, tofd, mhkd, dih, dkd)
}

# Shown in every folder name of the methods that take them; other hyper-parameters only when not the default.
ALWAYS_NAMED = ("alpha", "temperature", "beta")


def run_name(student: str, method: str, teacher: str | None, hyper: dict[str, Any], ta: str | None = None) -> str:
    """`student-<student>-<method>[-<teacher>][-ta-<assistant>]-<hyper-parameters>`: one folder per setting."""
    spec = METHODS[method]
    parts = ["student", student, method]
    if spec.teacher != "none":
        parts.append(teacher)
    if ta is not None:
        parts += ["ta", ta]
    for key, default in spec.defaults.items():
        value = hyper.get(key, default)
        if key not in ALWAYS_NAMED and value == default:
            continue
        code = HYPERS[key].code or key
        if isinstance(value, bool):
            parts.append(code if value else f"no_{code}")
        elif isinstance(value, str):
            parts.append(value)
        else:
            parts.append(f"{code}{value:g}")
    return "-".join(parts)
