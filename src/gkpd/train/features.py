"""Intermediate states as distillation targets: the ``feature_pairs`` of
:class:`gkpd.train.FitConfig` (student module name -> teacher module name)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from gkpd.plan.select import Pattern, as_pattern_list, check_patterns, matches
from gkpd.train.objectives import state_distance, state_tensor


class _Taps:
    """Records the outputs of named modules during a forward pass."""

    def __init__(self, model: nn.Module, names: Iterable[str], role: str) -> None:
        modules = dict(model.named_modules())
        self.outputs: dict[str, object] = {}
        self.handles = []
        for name in names:
            if name not in modules:
                raise ValueError(
                    f"feature_pairs names {role} module {name!r}, which does not exist"
                )
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            self.outputs[name] = output

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class FeaturePairs:
    """Taps on the student's and the teacher's modules that ``pairs`` names, and the summed
    distance (:func:`gkpd.train.objectives.state_distance`) between their outputs after a
    forward pass of both; a module's output is read by ``state_tensor`` (a tensor, a tuple's
    first element, a ``last_hidden_state``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Mapping[str, str],
                 kind: str) -> None:
        self.pairs = dict(pairs)
        self.kind = kind
        self.student = _Taps(student, self.pairs.keys(), "student")
        try:
            self.teacher = _Taps(teacher, self.pairs.values(), "teacher")
        except ValueError:
            self.student.remove()
            raise

    def distance(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for s_name, t_name in self.pairs.items():
            what = f"feature_pairs {s_name!r} -> {t_name!r}"
            term = state_distance(
                state_tensor(self.student.outputs[s_name], what),
                state_tensor(self.teacher.outputs[t_name], what),
                kind=self.kind, mask=mask, what=what,
            )
            total = term if total is None else total + term
        return total

    def remove(self) -> None:
        self.student.remove()
        self.teacher.remove()


def same_name_pairs(student: nn.Module, teacher: nn.Module,
                    patterns: Pattern | Iterable[Pattern]) -> dict[str, str]:
    """``{name: name}`` for each module of ``student`` that one of ``patterns`` names (module
    types, names or ``"re:"`` regexes, as ``include=`` of :func:`gkpd.plan` takes them) and
    that ``teacher`` has under the same name: compression keeps module names, so each block
    of a compressed model pairs with its dense teacher's. ``feature_pairs`` for
    :class:`gkpd.train.FitConfig`; ``ValueError`` when a pattern names no such module."""
    patterns = as_pattern_list(patterns, "feature_layers")
    check_patterns(patterns, "feature_layers")
    teacher_names = {name for name, _ in teacher.named_modules()}
    pairs: dict[str, str] = {}
    for pattern in patterns:
        found = [name for name, module in student.named_modules()
                 if name and name in teacher_names and matches(pattern, name, module)]
        if not found:
            raise ValueError(f"feature_layers pattern {pattern!r} names no module that the "
                             "student and the teacher both have")
        pairs.update((name, name) for name in found)
    return pairs
