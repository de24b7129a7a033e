"""What one gate decision read: the gate document and the waiter's place, each with the
version its compare-and-swap writes against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from provisioner.gates.place import Place

Document = TypeVar("Document")


@dataclass(slots=True)
class LoadedDocument(Generic[Document]):
    now_ms: int
    state: Document
    gate_version: int | None
    place: Place | None
    place_version: int | None
    # The load itself changed the document (a reservation passed over): save it.
    moved: bool = False
