"""The rules of a search request's parameters, in one place for every request path.

``/search`` is answered by the FastAPI route or by the raw fast path (:mod:`cmpnas.serving.raw_search`);
both resolve ``k`` and ``model`` with :func:`search_params`, so they accept and refuse the same requests with
the same messages. ``/search/vector`` (:mod:`cmpnas.serving.vector`) names its query model by fingerprint
(:func:`vector_params`) and shares the same ``k`` rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cmpnas.serving.state import Member, SearchService
from cmpnas.serving.uploads import UploadRejected


def check_k(k: int | None, *, max_k: int, default_k: int) -> int:
    """``k`` of a request (``None``: the default); out of range is UploadRejected (422) naming the range."""
    want = default_k if k is None else k
    if not 1 <= want <= max_k:
        raise UploadRejected(422, f"k must be between 1 and {max_k} (got {want}).")
    return want


def search_params(
    service: SearchService, k: int | None, model: str | None, *, max_k: int, default_k: int
) -> tuple[int, Member]:
    """(k, query model) of a request: ``None`` means the default; out of range or unknown is UploadRejected
    (422) naming the allowed values."""
    want = check_k(k, max_k=max_k, default_k=default_k)
    if model is None:
        return want, service.default
    member = service.members.get(model)
    if member is None:
        raise UploadRejected(
            422,
            f"Unknown query model '{model}'; available: {', '.join(service.members)} (default "
            f"'{service.default.name}', also when ?model= is left out).",
        )
    return want, member


def vector_params(
    service: SearchService, k: int | None, fingerprint: str | None, *, max_k: int, default_k: int
) -> tuple[int, Member]:
    """(k, query model) of a vector search. The model is named by fingerprint, not by name: a vector only
    means something in the space of the exact weights that computed it, so an unknown or missing fingerprint
    is UploadRejected (422) listing the fingerprints this server serves."""
    want = check_k(k, max_k=max_k, default_k=default_k)
    served = ", ".join(f"'{fp}' ({m.name})" for fp, m in service.by_fingerprint.items())
    if not fingerprint:
        raise UploadRejected(
            422,
            "The query model's fingerprint is missing: pass model=<fingerprint> of the model that computed the "
            f"vector (served: {served}; GET /models lists them).",
        )
    member = service.by_fingerprint.get(fingerprint)
    if member is not None:
        return want, member
    named = service.members.get(fingerprint)
    hint = (
        f" '{fingerprint}' is a model name: send its fingerprint '{named.fingerprint}'."
        if named is not None
        else " Embed the query with one of those models (GET /models has their .onnx files), or upload the image "
        "to /search."
    )
    raise UploadRejected(
        422, f"Unknown query model fingerprint '{fingerprint}'; this server serves {served}.{hint}"
    )


def validation_detail(errors: Sequence[Any], max_k: int) -> str:
    """FastAPI's list of field errors as one sentence naming the field and the fix, like every other 4xx
    ``detail`` of this service (a missing upload, a k that is not a number)."""
    if not errors:
        return "The request is malformed."
    err = errors[0]
    loc = [str(part) for part in err.get("loc", ())]
    name = loc[-1] if loc else "request"
    if name == "file":
        return (
            f"Field 'file': {err.get('msg', 'invalid')}. Send the query image as the multipart/form-data "
            "field 'file'."
        )
    if name == "k":
        return f"k must be an integer between 1 and {max_k} (got {err.get('input')!r})."
    return f"Field '{name}' ({' '.join(loc[:-1]) or 'request'}): {err.get('msg', 'invalid')}."
