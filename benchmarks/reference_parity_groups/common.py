"""Shared helpers: locating the authors' files, extracting functions from them, recording checks."""

from __future__ import annotations

import ast
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class MissingReference(Exception):
    """A reference file is not where the layout says it should be."""


ALIASES = {("rohitgandikota+unified-concept-editing", "35e91e2"): "uce-old"}  # older names of those folders


@dataclass
class Refs:
    """Where the authors' code lies: `root/<owner>+<name>/<path>` for the stated commit of each repository; a file
    of an older commit at `root/<owner>+<name>@<commit>/<path>`, else read from a git mirror
    (`mirrors/<owner>+<name>/repo` or `mirrors/<owner>+<name>`) with `git show <commit>:<path>`."""

    root: Path
    mirrors: Path | None = None

    def path(self, repo: str, rel: str) -> Path:
        path = self.root / repo / rel
        if not path.is_file():
            raise MissingReference(str(path))
        return path

    def source(self, repo: str, rel: str, commit: str | None = None) -> str:
        if commit is None:
            return self.path(repo, rel).read_text()
        local = self.root / f"{repo}@{commit}" / rel
        for candidate in (local, self.root / ALIASES.get((repo, commit), local) / rel):
            if candidate.is_file():
                return candidate.read_text()
        for git_dir in [self.mirrors / repo / "repo", self.mirrors / repo] if self.mirrors else []:
            if git_dir.is_dir():
                shown = subprocess.run(
                    ["git", "--git-dir", str(git_dir), "show", f"{commit}:{rel}"],
                    capture_output=True,
                    text=True,
                )
                if shown.returncode == 0:
                    return shown.stdout
        raise MissingReference(
            f"{local} (or {commit}:{rel} in a git mirror of {repo} given with --git-mirrors)"
        )


def extract(
    source: str, names, cls: str | None = None, filename: str = "<reference>", namespace=None
) -> dict:
    """Exec only the named top-level functions (or methods of class `cls`) of a reference file's source in
    `namespace` (its imports are not run: the caller supplies what they need); returns the namespace."""
    body = ast.parse(source).body
    if cls:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    nodes = [n for n in body if isinstance(n, ast.FunctionDef) and n.name in set(names)]
    missing = set(names) - {n.name for n in nodes}
    if missing:
        raise MissingReference(f"{filename} has no function {sorted(missing)[0]}")
    for node in nodes:
        node.decorator_list = []
    namespace = {} if namespace is None else namespace
    exec(compile(ast.Module(body=nodes, type_ignores=[]), filename, "exec"), namespace)
    return namespace


def max_diff(ours, ref) -> tuple[float, float]:
    """(max |ours - ref|, that / max |ref|) over lists of tensors."""
    a = torch.cat([t.detach().double().flatten() for t in ours])
    b = torch.cat([t.detach().double().flatten() for t in ref])
    diff = (a - b).abs().max().item()
    return diff, diff / max(b.abs().max().item(), 1e-30)


def jaccard(a: dict, b: dict) -> tuple[float, int, int]:
    """Jaccard index, differing entries and total entries of two dicts of boolean masks."""
    inter = union = wrong = total = 0
    for name in a:
        x, y = a[name].bool(), b[name].bool()
        inter += int((x & y).sum())
        union += int((x | y).sum())
        wrong += int((x != y).sum())
        total += x.numel()
    return inter / max(union, 1), wrong, total


@dataclass
class Results:
    group: str = ""
    out: Any = None  # where the result lines go (the group's own stdout is captured)
    checks: list = field(default_factory=list)

    def check(self, what: str, metric: str, value: float, tolerance: float, **extra) -> None:
        """Record one comparison: PASS when `value` (the stated metric) is at most `tolerance`."""
        ok = bool(value <= tolerance)
        self.checks.append(
            {
                "group": self.group,
                "check": what,
                "metric": metric,
                "value": value,
                "tolerance": tolerance,
                "pass": ok,
                **extra,
            }
        )
        print(
            f"[{'PASS' if ok else 'FAIL'}] {self.group}: {what}: {metric} = {value:.3g} (tolerance {tolerance:.3g})",
            file=self.out,
            flush=True,
        )
