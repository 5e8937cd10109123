"""Which model embeds an event, or a query, that names none: one rule for worker and gateway."""

from __future__ import annotations

from dataclasses import dataclass

from embedstream.settings import MODALITIES, Settings


def default_models(settings: Settings, served: dict[str, str]) -> dict[str, str]:
    """Modality -> the model used when none is named, for the models ``served``
    (name -> modality): the configured default of that modality when served,
    otherwise the first served model of the modality by name."""
    defaults: dict[str, str] = {}
    for modality in sorted(set(served.values())):
        names = sorted(n for n, m in served.items() if m == modality)
        choice = settings.default_model_for(modality) if modality in MODALITIES else None
        defaults[modality] = choice if choice in names else names[0]
    return defaults


@dataclass(frozen=True)
class Routing:
    """Which served models embed an event, by the model it names (or none).

    ``targets``: a model name events may name -> the served models that embed
    them (one; two while a rollout dual-writes; an empty tuple: not ours, the
    event is done without embedding, as in a backfill). ``defaults``: modality
    -> the name events that name none stand for. ``skip_others``: events naming
    a model missing from ``targets`` are skipped rather than dead-lettered as
    ``unknown_model``. A worker swaps its whole routing in one assignment.
    """

    targets: dict[str, tuple[str, ...]]
    defaults: dict[str, str]
    skip_others: bool = False

    @classmethod
    def plain(cls, settings: Settings, served: dict[str, str],
              targets: dict[str, tuple[str, ...]] | None = None,
              modality_of: dict[str, str] | None = None) -> Routing:
        """Each served model (name -> modality) embeds its own events, ``targets`` added
        (names routed elsewhere, with their modality in ``modality_of``)."""
        routes: dict[str, tuple[str, ...]] = {name: (name,) for name in served}
        routes.update(targets or {})
        names = {**served, **(modality_of or {})}
        return cls(routes, default_models(settings, {n: names[n] for n in routes if n in names}))
