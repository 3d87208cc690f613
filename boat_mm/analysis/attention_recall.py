# Copyright (c) boat-mm contributors. All rights reserved.
"""Attention recall: how much of the global attention FSLA's keys hold.

For one FSLA block, take its own queries and keys, compute the full softmax
attention of every query over all ``N`` tokens of the map (per head, in
chunks of queries so that memory stays bounded) and measure, per query,
the share of that attention mass that falls on a set of keys:

* ``cluster``: the keys the query attends to in FSLA: its cluster plus the
  keys borrowed from the sibling cluster, read from the slot layout and the
  sibling mask of :class:`~boat_mm.ops.ClusterPlan` exactly as
  :func:`boat_mm.ops.clustered_attention` uses them (:func:`fsla_keys`);
* ``window``: as many keys as ``cluster`` gives that query, taken in image
  space (:func:`window_keys`): first the tokens of the query's window in
  the image-space attention of the same block (BOAT-Swin's shifted 7x7
  window, BOAT-CSWin's cross of a horizontal and a vertical stripe, the
  whole map in CSWin's last stage), nearest to the query first (Euclidean
  distance on the map, ties in raster order); when the window holds fewer
  tokens than that, the nearest tokens outside it complete the set;
* ``random``: the FSLA layout (same cluster sizes, same borrowing) applied
  to a random balanced partition of the tokens (:func:`random_slots`):
  the chance level. The query is always among its own keys, so its
  expectation is ``a + (K - 1) / (N - 1) * (1 - a)`` for ``K`` keys and
  self-attention ``a``, which is ``K / N`` when ``a = 1 / N``.

:func:`~boat_mm.analysis.capture.capture_fsla` records the queries, keys
and clustering of FSLA modules during a normal forward pass;
:func:`block_recall` computes the three recalls of one record;
``tools/analysis_tools/attention_recall.py`` is the command-line front end.
Nothing here is imported by ``import boat_mm``.
"""
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from boat_mm.models.utils.cswin_attn import stripe_window_labels
from boat_mm.models.utils.window_attn import swin_window_labels
from boat_mm.ops import ClusterPlan, inverse_slots
from .capture import FSLARecord

__all__ = [
    'MEASURES', 'fsla_keys', 'random_slots', 'window_keys', 'window_labels',
    'swin_window_labels', 'stripe_window_labels', 'attention_recall',
    'global_attention', 'block_recall'
]

#: The key sets measured, in table order.
MEASURES = ('cluster', 'window', 'random')
# Elements of one chunk of attention probabilities (queries x keys).
_CHUNK_ELEMENTS = 1 << 22

# --- Key sets: (M, N, K) int64 token indices per query, -1 = none. ---


def fsla_keys(perm: Optional[Tensor], plan: ClusterPlan,
              num_rows: int) -> Tensor:
    """The keys of every query in FSLA.

    Cluster ``2j`` sees its own tokens and the first ``overlap`` tokens of
    ``2j + 1``, which sees its own and the last ``overlap`` of ``2j``
    (``docs/fsla.md`` section 3); read here from ``plan.attn_mask`` over
    the slots of each sibling pair, as the attention op reads them.

    Args:
        perm (Tensor | None): ``(M, slots)`` token of every slot; None for
            a single cluster (every query sees every token).
        plan (ClusterPlan): The layout ``perm`` was made for.
        num_rows (int): ``M``, (sample, head) pairs.

    Returns:
        Tensor: ``(M, N, K)`` int64 keys of each query, ``-1`` padded;
        ``K = N`` for a single cluster, else two slot sizes.
    """
    N = plan.num_tokens
    if plan.num_clusters == 1:
        return torch.arange(N).expand(num_rows, N, N)
    P, S = plan.num_pairs, plan.slot_size
    M = perm.shape[0]
    inv = inverse_slots(perm, plan)  # (M, N) slot of every token
    pair, local = inv // (2 * S), inv % (2 * S)
    mask = plan.attn_mask
    if mask.dim() == 2:  # uniform plans share one pair mask
        mask = mask.expand(P, -1, -1)
    allowed = mask[pair, local]  # (M, N, 2S)
    tokens = perm[:, :2 * P * S].reshape(M, P, 2 * S)
    keys = tokens.gather(1, pair.unsqueeze(-1).expand(M, N, 2 * S))
    return torch.where(allowed, keys, -1)


def random_slots(
        plan: ClusterPlan,
        num_rows: int,
        generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """Slots of a random balanced partition with FSLA's cluster sizes.

    Args:
        plan (ClusterPlan): The layout (cluster sizes, padding slots).
        num_rows (int): ``M``, one independent partition per row.
        generator (torch.Generator, optional): Source of randomness.

    Returns:
        Tensor | None: ``(M, slots)`` for :func:`fsla_keys`: every real
        slot holds a token drawn without replacement (padding slots hold
        token 0, which the layout never uses); None for a single cluster.
    """
    if plan.num_clusters == 1:
        return None
    N = plan.num_tokens
    shuffled = torch.rand(num_rows, N, generator=generator).argsort(dim=1)
    slots = torch.zeros(num_rows, plan.slot_valid.numel(), dtype=torch.long)
    slots[:, plan.slot_valid] = shuffled
    return slots


def window_labels(attn: nn.Module, hw_shape: Sequence[int]) -> Tensor:
    """Window labels of a block's image-space attention module.

    Args:
        attn (nn.Module): A block's ``attn``, which gives its windows by
            a method ``window_labels(hw_shape)`` returning labels as this
            function does (BOAT-Swin's :class:`BOATShiftWindowMSA`,
            BOAT-CSWin's :class:`CSWinAttention`).
        hw_shape (Sequence[int]): ``(H, W)``.

    Returns:
        Tensor: ``(L, N)`` labels, see :func:`window_keys`.
    """
    own = getattr(attn, 'window_labels', None)
    if callable(own):
        return own(hw_shape)
    raise TypeError(
        f'No image-space window is known for {type(attn).__name__}: give '
        f'the class a method window_labels(hw_shape) returning (L, N) '
        f'labels, tokens sharing a label in any row being one window (as '
        f'boat_mm.analysis.swin_window_labels does for Swin windows)')


def window_keys(labels: Tensor, hw_shape: Sequence[int],
                num_keys: Tensor) -> Tensor:
    """Image-space keys of every query, as many as ``num_keys`` says.

    Tokens are ranked per query: those of its window first (a token is in
    the window when it shares the query's label in any row of ``labels``),
    then by squared Euclidean distance on the map, then in raster order;
    the first ``num_keys`` are kept. So the window is cut to the nearest
    tokens when larger, and completed with the nearest outside it when
    smaller.

    Args:
        labels (Tensor): ``(L, N)`` window labels (:func:`window_labels`).
        hw_shape (Sequence[int]): ``(H, W)``.
        num_keys (Tensor): ``(M, N)`` int64 keys wanted per query.

    Returns:
        Tensor: ``(M, N, K)`` int64 keys, ``-1`` padded,
        ``K = num_keys.max()``.
    """
    H, W = (int(n) for n in hw_shape)
    N = H * W
    K = int(num_keys.max())
    r, c = torch.arange(N) // W, torch.arange(N) % W
    far = (H - 1)**2 + (W - 1)**2 + 1
    ranked = torch.empty(N, K, dtype=torch.long)
    step = max(1, _CHUNK_ELEMENTS // N)
    for s in range(0, N, step):
        e = min(N, s + step)
        d2 = (r[s:e, None] - r)**2 + (c[s:e, None] - c)**2
        inside = (labels[:, s:e, None] == labels[:, None, :]).any(0)
        score = ((~inside).long() * far + d2) * N + torch.arange(N)
        ranked[s:e] = score.topk(K, dim=1, largest=False).indices
    keep = torch.arange(K) < num_keys.unsqueeze(-1)
    return torch.where(keep, ranked.expand(num_keys.shape[0], N, K), -1)


# --- Attention. ---


def attention_recall(q: Tensor,
                     k: Tensor,
                     key_sets: Mapping[str, Tensor],
                     scale: float,
                     chunk_size: Optional[int] = None) -> Dict[str, Tensor]:
    """Share of each query's full softmax attention on given key sets.

    Args:
        q (Tensor): ``(M, N, d)`` queries.
        k (Tensor): ``(M, N, d)`` keys.
        key_sets (Mapping[str, Tensor]): Name to ``(M, N, K)`` int64 keys
            per query, ``-1`` padded (broadcastable over ``M``).
        scale (float): Logit scale.
        chunk_size (int, optional): Queries per chunk; None for about
            4M probabilities per chunk.

    Returns:
        dict[str, Tensor]: Name to ``(M, N)`` recall in ``[0, 1]``, in
        ``q``'s dtype.
    """
    M, N, _ = q.shape
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // N)
    out = {name: q.new_empty(M, N) for name in key_sets}
    for m in range(M):
        for s in range(0, N, chunk_size):
            e = min(N, s + chunk_size)
            probs = (q[m, s:e] @ k[m].T * scale).softmax(-1)
            for name, keys in key_sets.items():
                idx = keys[min(m, keys.shape[0] - 1), s:e]
                mass = probs.gather(1, idx.clamp(min=0))
                out[name][m, s:e] = mass.masked_fill(idx < 0, 0).sum(-1)
    return out


def global_attention(q: Tensor, k: Tensor, scale: float, query: int) -> Tensor:
    """Full softmax attention of one query over all keys.

    Args:
        q (Tensor): ``(N, d)`` queries.
        k (Tensor): ``(N, d)`` keys.
        scale (float): Logit scale.
        query (int): Index of the query.

    Returns:
        Tensor: ``(N,)`` attention probabilities of that query.
    """
    return (q[query] @ k.T * scale).softmax(-1)


def block_recall(record: FSLARecord,
                 labels: Tensor,
                 generator: Optional[torch.Generator] = None,
                 chunk_size: Optional[int] = None) -> Dict[str, Tensor]:
    """The three recalls of every query of one FSLA record.

    Args:
        record (FSLARecord): From
            :func:`~boat_mm.analysis.capture.capture_fsla`.
        labels (Tensor): ``(L, N)`` window labels of the block.
        generator (torch.Generator, optional): For the random partition.
        chunk_size (int, optional): See :func:`attention_recall`.

    Returns:
        dict[str, Tensor]: ``cluster``, ``window``, ``random`` recalls and
        ``keys`` (the key count of each query), each ``(B, heads, N)``.
    """
    B, h, N, d = record.q.shape
    M = B * h
    q, k = record.q.reshape(M, N, d), record.k.reshape(M, N, d)
    cluster = fsla_keys(record.perm, record.plan, M)
    num_keys = (cluster >= 0).sum(-1)
    key_sets = dict(
        cluster=cluster,
        window=window_keys(labels, record.hw_shape, num_keys),
        random=fsla_keys(
            random_slots(record.plan, M, generator), record.plan, M))
    out = attention_recall(q, k, key_sets, record.scale, chunk_size)
    out['keys'] = num_keys
    return {name: v.reshape(B, h, N) for name, v in out.items()}
