"""The attack registry: searches and fine-tunings that try to bring an erased class or concept back
(reference/attacks.md). `unlearn ls attacks` lists them; `unlearn attack RUN_DIR --attack NAME` or a recipe's
`eval.attacks` runs them, with Retrain as the control (`unlearn.attacks.run`)."""

from __future__ import annotations

import difflib

from ..errors import ConfigError
from .base import Attack, Probe, Target, residual, wilson
from .catalogue import ALL

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in ALL}


def get_attack(name: str, family: str | None = None) -> type[Attack]:
    """The attack class registered as `name`; refuses unknown names and families it does not apply to."""
    if name not in ATTACKS:
        close = difflib.get_close_matches(name, ATTACKS, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown attack {name!r}; {hint}known attacks: {', '.join(ATTACKS)}")
    cls = ATTACKS[name]
    if family is not None and family not in cls.families:
        raise ConfigError(
            f"attack {name!r} does not apply to the {family} family; it applies to: {', '.join(cls.families)}"
        )
    return cls


def attack_names() -> list[str]:
    return list(ATTACKS)


__all__ = [
    "ATTACKS",
    "Attack",
    "Probe",
    "Target",
    "attack_names",
    "get_attack",
    "residual",
    "wilson",
]
