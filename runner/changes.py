"""What changed between a stored identity record and the current one, in words.

An identity record is what a stage read: params, inputs, upstream fingerprints, library
versions and the fingerprint made of them (runner.plan.StageStatus.identity). The plan explains
a stale stage with it, and the train stage a new attempt against the previous attempt's
attempt.json. A leaf: it imports nothing of the runner but the fingerprint and `flatten`.
"""

from __future__ import annotations

from typing import Any, Protocol

from runner.recipe.model import flatten
from runner.state import fingerprint


class Identity(Protocol):
    """The current side of a comparison (runner.plan.StageStatus is one)."""

    @property
    def name(self) -> str: ...

    params: dict[str, Any]
    inputs: dict[str, Any]
    upstream: dict[str, str]
    libraries: dict[str, str]


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            changes.append(f"{key} (new) {_short(new[key])}")
        elif key not in new:
            changes.append(f"{key} removed")
        elif old[key] != new[key]:
            changes.append(f"{key} {_short(old[key])} -> {_short(new[key])}")
    return changes


def _flat_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return flatten({k: v for k, v in inputs.items()}) if inputs else {}


def _part(stored: dict[str, Any], key: str) -> dict[str, Any]:
    value = stored.get(key)  # attempt.json is read without read_state's type checks
    return value if isinstance(value, dict) else {}


def explain(stored: dict[str, Any], current: Identity) -> list[str]:
    """Why a stage's fingerprint changed, most specific first."""
    reasons = []
    recorded = {k: _part(stored, k) for k in ("params", "inputs", "upstream", "libraries")}
    params = _diff(recorded["params"], current.params)
    if params:
        reasons.append("changed params: " + ", ".join(params))
    inputs = _diff(_flat_inputs(recorded["inputs"]), _flat_inputs(current.inputs))
    if inputs:
        reasons.append("changed inputs: " + ", ".join(k.split(" ")[0] for k in inputs))
    upstream = [u for u, fp in current.upstream.items() if recorded["upstream"].get(u) != fp]
    if upstream:
        reasons.append("upstream changed: " + ", ".join(upstream))
    libs = _diff(recorded["libraries"], current.libraries)
    if libs:
        reasons.append("library versions changed: " + ", ".join(libs))
    if reasons:
        return reasons
    if fingerprint({"stage": current.name, **recorded}) != stored.get("fingerprint"):
        # what the file says it read gives today's fingerprint, not the one stored with it
        return ["stored fingerprint does not match its recorded params (state edited?)"]
    return ["fingerprint changed (runner version)"]
