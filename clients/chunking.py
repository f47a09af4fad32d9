"""Split a call's images into requests the server accepts: at most `max_images_per_request` images
(a pair counts two, and never more than the queue holds), at most `max_parts` parts, a body of at
most `max_body_bytes`, and for dense correspondences at most `max_dense_elements` values.

Order is kept: chunks are consecutive ranges, so results concatenate back in input order.
"""

from __future__ import annotations

from collections.abc import Sequence

from cotap.client.info import ServerLimits

# Bytes a multipart part adds around its data: boundary line, Content-Disposition with a short
# file name, Content-Type and CRLFs (about 150 in practice; kept generous).
PART_OVERHEAD = 320
BODY_OVERHEAD = 128  # the closing boundary


def body_bytes(sizes: Sequence[int]) -> int:
    """An upper bound on the multipart body that carries parts of these sizes."""
    return sum(sizes) + PART_OVERHEAD * len(sizes) + BODY_OVERHEAD


def max_part_bytes(limits: ServerLimits, parts_per_item: int = 1) -> int:
    """The largest single item (all its parts together) that fits in a request on its own."""
    return limits.max_body_bytes - PART_OVERHEAD * parts_per_item - BODY_OVERHEAD


def plan_chunks(
    item_bytes: Sequence[int],
    limits: ServerLimits,
    *,
    parts_per_item: int = 1,
    max_items: int | None = None,
    weights: Sequence[int] | None = None,
    max_weight: int | None = None,
) -> list[range]:
    """Consecutive ranges of item indices, each within every limit.

    `item_bytes[i]`: the encoded size of item i (all its parts); `max_items`: a further cap of your
    own; `weights`/`max_weight`: an extra additive budget (dense similarity elements). An item that
    alone breaks a limit gets a chunk of its own (the server then refuses it, and only it).
    """
    per_request = max(1, limits.images_per_request // parts_per_item)
    if max_items is not None:
        per_request = max(1, min(per_request, max_items))
    budget = limits.max_body_bytes - BODY_OVERHEAD
    chunks: list[range] = []
    start, used, weight = 0, 0, 0
    for i, size in enumerate(item_bytes):
        cost = size + PART_OVERHEAD * parts_per_item
        w = weights[i] if weights is not None else 0
        full = (
            i - start >= per_request
            or used + cost > budget
            or (max_weight is not None and weight + w > max_weight)
        )
        if full and i > start:
            chunks.append(range(start, i))
            start, used, weight = i, 0, 0
        used += cost
        weight += w
    if start < len(item_bytes):
        chunks.append(range(start, len(item_bytes)))
    return chunks
