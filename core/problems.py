"""Problems of one kind, grouped: a count and a few examples instead of one clause per tensor.

A manifest that misses an engine's naming scheme can be wrong in every one of its hundreds
of tensors; listing each makes the one useful fact (what the engine expected instead)
unreadable. A kind with at most `max_examples` problems keeps its full clauses; a larger
one becomes one line:

    72 unknown tensors, e.g. 'model.layers.0.mlp.experts.0.down_proj.weight', ...; the engine's inventory has e.g. ... instead
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Problems", "dtype_fix", "examples", "group_by_subject"]


def examples(items: Iterable[str], limit: int = 3) -> str:
    """`'a', 'b', 'c'` and `... (N more)` past `limit`."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def dtype_fix(dtype: str) -> str:
    """How a trainer sends in the engine's dtype, through the Python API and the CLI."""
    return f"send in it: WeightSync(dtype={dtype!r}) or `weightsync push --dtype {dtype}`"


@dataclass(slots=True)
class _Kind:
    clauses: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    hint: str = ""


class Problems:
    """Collects problems by kind (a plural noun phrase, e.g. "unknown tensors"), in the order first seen."""

    def __init__(self, max_examples: int = 3) -> None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        self.max_examples = max_examples
        self._kinds: dict[str, _Kind] = {}

    def add(self, kind: str, clause: str, subject: str) -> None:
        """One problem: its full clause (shown when the kind is small) and its subject (an example when grouped)."""
        k = self._kinds.setdefault(kind, _Kind())
        k.clauses.append(clause)
        k.subjects.append(subject)

    def hint(self, kind: str, text: str) -> None:
        """What to do about a kind, appended to its grouped line (e.g. what the engine has instead)."""
        if kind in self._kinds:
            self._kinds[kind].hint = text

    def count(self, kind: str) -> int:
        k = self._kinds.get(kind)
        return len(k.clauses) if k else 0

    def __bool__(self) -> bool:
        return bool(self._kinds)

    def render(self) -> list[str]:
        lines: list[str] = []
        for kind, k in self._kinds.items():
            if len(k.clauses) <= self.max_examples:
                lines.extend(k.clauses)
            else:
                line = f"{len(k.clauses)} {kind}, e.g. {examples(k.subjects, self.max_examples)}"
                lines.append(f"{line}; {k.hint}" if k.hint else line)
        return lines


def group_by_subject(per_subject: dict[str, list[str]], label: str, max_examples: int = 3) -> list[str]:
    """`label 'x': problem` per subject, or one line for subjects that share the same problems once they are many.

    E.g. per daemon: 40 daemons with the same wrong manifest give one line
    "40 daemons ('d0', 'd1', 'd2', ... (37 more)): 72 unknown tensors, ...".
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    for subject, lines in per_subject.items():
        groups.setdefault(tuple(lines), []).append(subject)
    out: list[str] = []
    for lines, subjects in groups.items():
        if len(subjects) <= max_examples:
            out.extend(f"{label} {s!r}: {line}" for s in subjects for line in lines)
        else:
            out.extend(f"{len(subjects)} {label}s ({examples(subjects, max_examples)}): {line}" for line in lines)
    return out
