"""Which model embeds an event, or a query, that names none: one rule for worker and gateway."""

from __future__ import annotations

from embedstream.settings import Settings


def default_models(settings: Settings, served: dict[str, str]) -> dict[str, str]:
    """Modality -> the model used when none is named, for the models ``served``
    (name -> modality): the configured default of that modality when served,
    otherwise the first served model of the modality by name."""
    preferred = {
        "text": settings.default_text_model,
        "image": settings.default_image_model,
        "audio": settings.default_audio_model,
    }
    defaults: dict[str, str] = {}
    for modality in sorted(set(served.values())):
        names = sorted(n for n, m in served.items() if m == modality)
        choice = preferred.get(modality)
        defaults[modality] = choice if choice in names else names[0]
    return defaults
