"""Checks a trainer's manifest against every participant's inventory before any byte moves.

Every problem is collected, not only the first, so one answer tells the trainer all it must fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from weightsync.core import InvalidArgument, TensorSpec, apply_unit
from weightsync.core.rank_regions import RankRegions
from weightsync.core.problems import Problems, dtype_fix, examples, group_by_subject
from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["MAX_MANIFEST_TENSORS", "MAX_LISTED_PROBLEMS", "check_against_inventory", "check_needs", "parse_manifest"]

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
    manifest_names = {s.name for s in manifest}
    per_daemon: dict[str, list[str]] = {}
    for daemon_id, inventory in inventories.items():
        found = Problems()
        wanted_dtypes: set[str] = set()
        for spec in manifest:
            have = inventory.get(spec.name)
            if have is None:
                found.add("unknown tensors", f"unknown tensor {spec.name!r} (its engine has no such parameter)", spec.name)
            elif have.shape != spec.shape:
                found.add("shape mismatches", f"tensor {spec.name!r} shape: expected {list(have.shape)}, got {list(spec.shape)}",
                          f"{spec.name} {list(spec.shape)} instead of {list(have.shape)}")
            elif have.dtype != spec.dtype:
                wanted_dtypes.add(have.dtype)
                found.add("dtype mismatches", f"tensor {spec.name!r} dtype: expected {have.dtype} (the engine's dtype; "
                          f"{dtype_fix(have.dtype)}), got {spec.dtype}", f"{spec.name} {spec.dtype}")
        if found.count("unknown tensors"):
            absent = [n for n in inventory if n not in manifest_names]
            found.hint("unknown tensors", f"the engine's inventory has e.g. {examples(absent)} instead" if absent
                       else "the engine accepts none of them")
        if found.count("dtype mismatches"):
            found.hint("dtype mismatches", dtype_fix(wanted_dtypes.pop()) if len(wanted_dtypes) == 1 else
                       "send each tensor in the engine's dtype: WeightSync(dtype={name: dtype, ...})")
        _incomplete_fusion_groups(found, manifest_names, inventory.keys())
        if found:
            per_daemon[daemon_id] = found.render()
    if per_daemon:
        raise InvalidArgument("manifest does not match the engines", _capped(group_by_subject(per_daemon, "daemon")))


def _incomplete_fusion_groups(found: Problems, manifest_names: set[str], inventory_names: Iterable[str]) -> None:
    groups: dict[str, list[str]] = {}
    for name in inventory_names:
        groups.setdefault(apply_unit(name), []).append(name)
    for unit, members in groups.items():
        present = [m for m in members if m in manifest_names]
        if present and len(present) != len(members):
            missing = sorted(set(members) - set(present))
            found.add("modules sent in part", f"tensors of one module travel together: manifest has {sorted(present)} "
                      f"but not {missing}", unit)
    if found.count("modules sent in part"):
        found.hint("modules sent in part", "tensors of one module (q/k/v, gate/up, a weight and its bias) travel together")


def check_needs(needs: Sequence[RankRegions], inventory: Mapping[str, TensorSpec], num_ranks: int) -> list[str]:
    """What is wrong with a registration's needs (proto RegisterDaemonRequest.needs), grouped; [] if nothing.

    None at all is fine (every rank needs every tensor whole); otherwise exactly one entry
    per receiver rank 0..num_ranks-1, each naming inventory tensors with regions that fit
    their shapes. A rank that names a tensor nowhere does not need it.
    """
    if not needs:
        return []
    problems: list[str] = []
    if len(needs) != num_ranks:
        problems.append(f"needs: expected one entry per receiver rank (num_ranks {num_ranks}) or none, got {len(needs)}")
    ranks = [n.rank for n in needs]
    if any(r >= num_ranks for r in ranks) or len(set(ranks)) != len(ranks):
        problems.append(f"needs: ranks expected 0..{num_ranks - 1} once each, got {sorted(ranks)[:16]}")
    found = Problems()
    for i, entry in enumerate(needs):
        what = f"needs[{i}] (rank {entry.rank})"
        if len(entry.regions) > len(inventory):
            found.add("ranks with more regions than tensors", f"{what}: {len(entry.regions)} regions: expected at most "
                      f"{len(inventory)} (one per inventory tensor)", what)
            continue
        for name, region in entry.regions.items():
            spec = inventory.get(name)
            if spec is None:
                found.add("regions of unknown tensors", f"{what}: tensor {name!r} is not in the inventory", name)
                continue
            for line in region.problems(spec.shape, f"{what} tensor {name!r}"):
                found.add("regions that do not fit their tensor", line, f"{name} {region}")
    found.hint("regions of unknown tensors", "needs name inventory tensors only (the engine's checkpoint names)")
    return problems + found.render()
