"""The stages of one entity run; each is callable alone with a context and small manifests.

``extract(ctx, side)`` → ``validate(ctx, {side: manifest})`` → ``transform(ctx, manifest)`` →
``resolve(ctx, manifest)`` → ``load(ctx, resolved, side)`` per side → ``commit(ctx, resolved,
{side: manifest})``. See :mod:`d365sync.engine.pipeline` for the whole run and the plan.
"""

from __future__ import annotations

from d365sync.engine.stages.commit import commit
from d365sync.engine.stages.context import RunContext, Window
from d365sync.engine.stages.extract import Extraction, extract
from d365sync.engine.stages.load import load
from d365sync.engine.stages.prepare import RunValidationFailed, transform, validate, validate_and_transform
from d365sync.engine.stages.resolve import resolve

__all__ = [
    "Extraction",
    "RunContext",
    "RunValidationFailed",
    "Window",
    "commit",
    "extract",
    "load",
    "resolve",
    "transform",
    "validate",
    "validate_and_transform",
]
