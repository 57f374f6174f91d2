"""The one greedy decode loop: :func:`~nexus_client.hf.generate` and the evaluation's settings both
write their answers with it (what differs, the forward pass and any policy call after it, is the
caller's ``forward``)."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch


def greedy_decode(logits: torch.Tensor, forward: Callable[[int, int], torch.Tensor], max_new_tokens: int,
                  stop_ids: Collection[int] = (), *, keep_stop: bool = False,
                  on_token: Callable[[int], None] | None = None) -> list[int]:
    """Greedy tokens starting from ``logits`` (the prompt's last position).

    ``forward(token, step)`` feeds decode step ``step``'s token and returns the next logits; it is
    not called for the last token (nothing would read its logits). A token in ``stop_ids`` ends the
    answer, included when ``keep_stop``. ``on_token`` sees every token kept.
    """
    out: list[int] = []
    for step in range(max_new_tokens):
        token = int(torch.argmax(logits))
        stop = token in stop_ids
        if stop and not keep_stop:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        if stop or step == max_new_tokens - 1:
            break
        logits = forward(token, step)
    return out
