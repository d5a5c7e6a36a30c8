"""Checks a trainer's manifest against every participant's inventory before any byte moves.

Every problem is collected, not only the first, so one answer tells the trainer all it must fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from weightsync.core import InvalidArgument, TensorSpec, apply_unit
from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["MAX_MANIFEST_TENSORS", "MAX_LISTED_PROBLEMS", "parse_manifest", "check_against_inventory"]

MAX_MANIFEST_TENSORS = 1_000_000
MAX_LISTED_PROBLEMS = 40


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_LISTED_PROBLEMS:
        return problems
    return problems[:MAX_LISTED_PROBLEMS] + [f"... and {len(problems) - MAX_LISTED_PROBLEMS} more"]


def parse_manifest(entries: Sequence[pb.TensorSpec]) -> list[TensorSpec]:
    """Converts and self-checks a manifest: empty, malformed entries, duplicate names."""
    if not entries:
        raise InvalidArgument("manifest is empty: expected at least one tensor")
    if len(entries) > MAX_MANIFEST_TENSORS:
        raise InvalidArgument(f"manifest has {len(entries)} tensors: expected at most {MAX_MANIFEST_TENSORS}")
    problems: list[str] = []
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        try:
            spec = TensorSpec(e.name, tuple(e.shape), e.dtype)
        except ValueError as err:
            problems.append(f"manifest[{i}]: {err}")
            continue
        if spec.name in seen:
            problems.append(f"manifest[{i}]: duplicate tensor name {spec.name!r}")
            continue
        seen.add(spec.name)
        specs.append(spec)
    if problems:
        raise InvalidArgument("manifest is invalid", _capped(problems))
    return specs


def check_against_inventory(
    manifest: Sequence[TensorSpec], inventories: Mapping[str, Mapping[str, TensorSpec]]
) -> None:
    """Raises InvalidArgument listing every unknown name, shape or dtype mismatch per daemon.

    The wire dtype is the engine's dtype: the trainer casts before sending. The tensors of
    one apply unit (a module; q/k/v and gate/up fused, weights with their biases) travel
    together, since vLLM rebuilds a partly-updated module from uninitialised memory.
    """
    problems: list[str] = []
    manifest_names = {s.name for s in manifest}
    for daemon_id, inventory in inventories.items():
        for spec in manifest:
            have = inventory.get(spec.name)
            if have is None:
                problems.append(f"daemon {daemon_id!r}: unknown tensor {spec.name!r} (its engine has no such parameter)")
            elif have.shape != spec.shape:
                problems.append(
                    f"daemon {daemon_id!r}: tensor {spec.name!r} shape: expected {list(have.shape)}, got {list(spec.shape)}"
                )
            elif have.dtype != spec.dtype:
                problems.append(
                    f"daemon {daemon_id!r}: tensor {spec.name!r} dtype: expected {have.dtype} (the engine's dtype; "
                    f"cast before sending), got {spec.dtype}"
                )
        problems.extend(_incomplete_fusion_groups(daemon_id, manifest_names, inventory.keys()))
    if problems:
        raise InvalidArgument("manifest does not match the engines", _capped(problems))


def _incomplete_fusion_groups(daemon_id: str, manifest_names: set[str], inventory_names: Iterable[str]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for name in inventory_names:
        groups.setdefault(apply_unit(name), []).append(name)
    problems = []
    for members in groups.values():
        present = [m for m in members if m in manifest_names]
        if present and len(present) != len(members):
            missing = sorted(set(members) - set(present))
            problems.append(
                f"daemon {daemon_id!r}: tensors of one module travel together: manifest has {sorted(present)} "
                f"but not {missing}"
            )
    return problems
