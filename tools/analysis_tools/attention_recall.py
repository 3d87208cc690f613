# Copyright (c) boat-mm contributors. All rights reserved.
"""How much of the global attention FSLA's clusters hold, against windows.

For every FSLA block of a BOAT model (an mmpretrain, mmseg or mmdet config,
chosen by its ``default_scope``), with that block's own queries and keys on
the given images, the full softmax attention of every query over all
tokens of the map is computed (per head, in chunks of queries), and per
query the share of its attention mass on three key sets of equal size:

* ``cluster``: the keys it attends to in FSLA (its cluster and the keys
  borrowed from the sibling cluster);
* ``window``: the same number of keys in image space: the query's window
  in the block's own image-space attention (BOAT-Swin's shifted 7x7
  window, BOAT-CSWin's cross of stripes), nearest first, completed with the
  nearest tokens outside it when the window is smaller;
* ``random``: FSLA's layout on a random balanced partition (chance,
  about keys / N).

Prints a table per stage and block (mean and quartiles over queries, heads
and images); ``--json`` writes the means, ``--out-file`` draws them with a
map of one query's global attention, its cluster and its window outlined.
See ``docs/attention_recall.md``.

Examples::

    python tools/analysis_tools/attention_recall.py \\
        configs/demo/boat-cswin-tiny_upernet_demo.py img1.jpg img2.jpg \\
        --checkpoint work_dirs/demo/iter_2000.pth \\
        --out-file recall.png --json recall.json

Exit status 2 (one line on stderr) when a map has more than
``--max-tokens`` tokens.
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from mmengine.dataset import pseudo_collate
from mmengine.logging import print_log

import boat_mm  # noqa: F401  (registers the BOAT models)
from boat_mm.analysis import (MEASURES, TooManyTokensError, block_recall,
                              capture_fsla, find_fsla_modules, fsla_keys,
                              get_boat_backbone, global_attention, window_keys,
                              window_labels)

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.cli import (ArgumentParser, UsageError, add_model_args,
                            add_shape_arg, check_image, check_output_file,
                            load_config, tool_main)
from boat_tools.inference import build_model, build_pipeline, token_stride

TOOL = 'attention_recall'
Location = Tuple[int, int]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = ArgumentParser(
        description='Share of the global attention that FSLA clusters, '
        'image-space windows and random partitions of equal size hold')
    parser.add_argument(
        'config', help='mmpretrain, mmseg or mmdet config file')
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='images')
    parser.add_argument(
        '--out-file', help='draw recall per block and one query\'s map')
    parser.add_argument(
        '--json',
        help='write [{stage, block, keys, cluster, window, '
        'random}] (means) to this file')
    parser.add_argument(
        '--max-tokens',
        type=int,
        default=16384,
        help='refuse maps with more tokens (full attention costs N^2 per '
        'head; default 16384, a 128x128 map)')
    add_shape_arg(
        parser, 'resize the images to H x W instead of the config\'s test '
        'pipeline resizing')
    parser.add_argument(
        '--block',
        type=int,
        nargs=2,
        metavar=('STAGE', 'BLOCK'),
        help='FSLA block of the attention map in --out-file (default: the '
        'first one)')
    parser.add_argument(
        '--map-image',
        type=int,
        default=0,
        help='index in the IMAGE list of the image of that map (default 0)')
    parser.add_argument(
        '--query',
        type=int,
        nargs=2,
        metavar=('X', 'Y'),
        help='pixel of that image (as the model sees it) whose token is the '
        'query of that map (default: the centre)')
    parser.add_argument(
        '--seed',
        type=int,
        default=0,
        help='seed of the random partitions (and of the random weights '
        'without --checkpoint)')
    add_model_args(parser, head_help='head of that map (default 0)')
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error(f'--max-tokens must be >= 1, got {args.max_tokens}')
    return args


def measure(model, inputs: torch.Tensor, max_tokens: int,
            generator: torch.Generator) -> Dict[Location, dict]:
    """Recalls of every FSLA block for one batch of model inputs.

    Returns:
        dict: Per ``(stage, block)``: ``record`` (the
        :class:`~boat_mm.analysis.FSLARecord`), ``labels`` (its window
        labels) and the ``(B, heads, N)`` tensors of
        :func:`~boat_mm.analysis.block_recall`.
    """
    backbone = get_boat_backbone(model)
    with capture_fsla(backbone, max_tokens=max_tokens) as records, \
            torch.no_grad():
        backbone(inputs)
    out = {}
    for (stage, block), recs in records.items():
        record = recs[0]
        attn = backbone.stages[stage].blocks[block].attn
        try:
            labels = window_labels(attn, record.hw_shape)
        except TypeError as err:  # a family whose windows are not known
            raise UsageError(f'stage {stage}, block {block}: {err}') from None
        out[(stage, block)] = dict(
            record=record,
            labels=labels,
            **block_recall(record, labels, generator))
    return out


def summarize(per_image: List[Dict[Location, dict]]) -> List[dict]:
    """Means and quartiles over queries, heads and images, per block."""
    rows = []
    for loc in per_image[0]:
        res = [r[loc] for r in per_image]
        shapes = sorted({r['record'].hw_shape for r in res})
        row = dict(
            stage=loc[0],
            block=loc[1],
            maps=' '.join(f'{h}x{w}' for h, w in shapes),
            tokens=float(
                np.mean([np.prod(r['record'].hw_shape) for r in res])),
            keys=float(
                torch.cat([r['keys'].flatten() for r in res]).double().mean()))
        for name in MEASURES:
            # numpy: torch.quantile refuses more than 2**24 values.
            v = torch.cat([r[name].flatten() for r in res]).double().numpy()
            row[name] = float(v.mean())
            row[name + '_quartiles'] = np.quantile(v, [.25, .5, .75]).tolist()
        rows.append(row)
    return rows


def format_table(rows: List[dict]) -> str:
    """The table printed by the tool."""
    head = (f'{"stage":>5} {"block":>5} {"map":>9} {"keys":>7} ' +
            ' '.join(f'{name + " mean [q1 med q3]":>27}' for name in MEASURES))
    lines = [head, '-' * len(head)]
    for r in rows:
        cells = []
        for name in MEASURES:
            q1, med, q3 = r[name + '_quartiles']
            cells.append(f'{r[name]:.3f} [{q1:.3f} {med:.3f} {q3:.3f}]')
        lines.append(f'{r["stage"]:>5} {r["block"]:>5} {r["maps"]:>9} '
                     f'{r["keys"]:>7.1f} ' + ' '.join(f'{c:>27}'
                                                      for c in cells))
    return '\n'.join(lines)


def _outline(ax, mask: np.ndarray, stride: float, **kwargs) -> None:
    """Draw the border of a set of tokens (``(h, w)`` bool) in pixels."""
    from matplotlib.collections import LineCollection
    padded = np.pad(mask, 1)
    segments = []
    for r, c in zip(*np.nonzero(mask)):
        y0, x0, y1, x1 = r * stride, c * stride, (r + 1) * stride, (c + 1) * \
            stride
        if not padded[r, c + 1]:  # above
            segments.append([(x0, y0), (x1, y0)])
        if not padded[r + 2, c + 1]:  # below
            segments.append([(x0, y1), (x1, y1)])
        if not padded[r + 1, c]:  # left
            segments.append([(x0, y0), (x0, y1)])
        if not padded[r + 1, c + 2]:  # right
            segments.append([(x1, y0), (x1, y1)])
    ax.add_collection(LineCollection(segments, **kwargs))


def draw_figure(rows: List[dict],
                image: np.ndarray,
                result: dict,
                location: Location,
                head: int,
                query: int,
                stride: float,
                out_file: str,
                title: Optional[str] = None) -> dict:
    """Recall per block, and one query's global attention with its cluster
    and its window outlined. Returns what the map shows."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    record = result['record']
    H, W = record.hw_shape
    N = H * W
    m = head  # rows (sample 0, head)
    q = record.q[0, head].double()
    k = record.k[0, head].double()
    attn = global_attention(q, k, record.scale, query)
    B, h = record.q.shape[:2]
    cluster = fsla_keys(record.perm, record.plan, B * h)[m, query]
    num_keys = (fsla_keys(record.perm, record.plan, B * h) >= 0).sum(-1)
    window = window_keys(result['labels'], record.hw_shape, num_keys)[m, query]
    in_cluster = torch.zeros(N, dtype=torch.bool)
    in_cluster[cluster[cluster >= 0]] = True
    in_window = torch.zeros(N, dtype=torch.bool)
    in_window[window[window >= 0]] = True
    shown = dict(
        attention=attn.view(H, W).numpy(),
        cluster=in_cluster.view(H, W).numpy(),
        window=in_window.view(H, W).numpy(),
        query=(query // W, query % W),
        cluster_recall=float(attn[in_cluster].sum()),
        window_recall=float(attn[in_window].sum()))

    fig, (ax0, ax1) = plt.subplots(
        1, 2, figsize=(11, 4.6), gridspec_kw=dict(width_ratios=[1.25, 1]))
    x = np.arange(len(rows))
    styles = dict(
        cluster=('tab:blue', 'o'),
        window=('tab:orange', 's'),
        random=('tab:gray', '^'))
    for i, name in enumerate(MEASURES):
        color, marker = styles[name]
        mean = np.array([r[name] for r in rows])
        q1, q3 = (
            np.array([r[name + '_quartiles'][j] for r in rows])
            for j in (0, 2))
        off = (i - 1) * 0.12
        # The mean can lie outside the quartiles of a skewed distribution:
        # the bars are the quartiles, not an error around the mean.
        ax0.vlines(x + off, q1, q3, color=color, linewidth=2, alpha=0.5)
        ax0.plot(x + off, mean, color=color, marker=marker, label=name)
    ax0.set_xticks(x)
    ax0.set_xticklabels([
        f's{r["stage"]}b{r["block"]}\n{r["keys"]:.0f}/{r["tokens"]:.0f}'
        for r in rows
    ])
    ax0.set_xlabel('FSLA block (stage, block) and keys / tokens')
    ax0.set_ylabel('share of global attention\n(mean; bars: quartiles)')
    ax0.set_ylim(0, 1.02)
    ax0.grid(alpha=0.3)
    ax0.legend(loc='best')
    ax0.set_title(title or 'attention recall per block')

    ih, iw = image.shape[:2]
    ax1.imshow(image[..., ::-1], extent=(0, iw, ih, 0))
    # Colour and opacity grow with the attention (square root, so that
    # weak but wide attention shows): unattended tokens stay visible.
    level = PowerNorm(0.5, vmin=0, vmax=float(attn.max()))(shown['attention'])
    heat = plt.get_cmap('magma')(level)
    heat[..., 3] = 0.85 * level
    ax1.imshow(
        heat, extent=(0, W * stride, H * stride, 0), interpolation='nearest')
    _outline(ax1, shown['cluster'], stride, colors='cyan', linewidths=1.4)
    _outline(
        ax1,
        shown['window'],
        stride,
        colors='white',
        linewidths=1.4,
        linestyles='dashed')
    r, c = shown['query']
    ax1.plot(
        (c + .5) * stride, (r + .5) * stride,
        marker='*',
        color='lime',
        markersize=14,
        markeredgecolor='black')
    ax1.set_xlim(0, max(iw, W * stride))
    ax1.set_ylim(max(ih, H * stride), 0)
    ax1.set_xticks([])
    ax1.set_yticks([])
    ax1.set_title(
        f's{location[0]}b{location[1]} head {head}, query (row {r}, col {c}):'
        f'\ncluster (cyan) {shown["cluster_recall"]:.2f}, window (white) '
        f'{shown["window_recall"]:.2f} of its attention',
        fontsize=9)
    fig.tight_layout()
    folder = osp.dirname(out_file)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(out_file, dpi=80)
    plt.close(fig)
    return shown


@tool_main
def main(argv: Optional[List[str]] = None) -> dict:
    """Run the tool; returns ``rows`` (the table), ``records`` (the JSON
    records), ``per_image`` (per image, per block: the record, window
    labels and per-query recalls) and ``shown`` (what the map draws)."""
    args = parse_args(argv)
    if not 0 <= args.map_image < len(args.images):
        raise UsageError(f'--map-image must index the {len(args.images)} '
                         f'image(s) given, got {args.map_image}.')
    for path in args.images:
        check_image(path)
    for what, path, example in (('--out-file', args.out_file, 'recall.png'),
                                ('--json', args.json, 'recall.json')):
        if path:
            check_output_file(path, what, example)
    cfg = load_config(args.config, args.cfg_options)
    # Before the model is built: a config without a test pipeline fails.
    pipeline = build_pipeline(cfg, args.shape, TOOL)
    # Without --checkpoint the weights are a seeded random initialisation.
    torch.manual_seed(args.seed)
    model = build_model(cfg, args.checkpoint, args.device, TOOL)
    backbone = get_boat_backbone(model)
    modules = find_fsla_modules(backbone)
    if not modules:
        raise UsageError(
            'The backbone has no FSLA modules (built with with_fsla=False?); '
            'there is no attention recall to measure.')
    location = tuple(args.block) if args.block else next(iter(modules))
    if location not in modules:
        listed = ', '.join(f'(stage {i}, block {j})' for i, j in modules)
        raise UsageError(f'Stage {location[0]}, block {location[1]} has no '
                         f'FSLA module. FSLA is in: {listed}.')
    if not 0 <= args.head < modules[location].num_heads:
        raise UsageError(f'--head {args.head} is out of range: FSLA at stage '
                         f'{location[0]}, block {location[1]} has '
                         f'{modules[location].num_heads} heads.')

    generator = torch.Generator().manual_seed(args.seed)
    per_image, shown_data = [], None
    for i, path in enumerate(args.images):
        data = pipeline(dict(img_path=path))
        batch = model.data_preprocessor(pseudo_collate([data]), False)
        try:
            per_image.append(
                measure(model, batch['inputs'], args.max_tokens, generator))
        except TooManyTokensError as err:
            raise UsageError(f'{osp.basename(path)}: {err}') from None
        if i == args.map_image:
            shown_data = data
    rows = summarize(per_image)
    print(f'Attention recall of {len(rows)} FSLA blocks over '
          f'{len(args.images)} image(s): share of each query\'s global '
          f'attention on its FSLA keys (cluster), on as many image-space '
          f'keys (window) and on a random balanced partition (random).')
    print(format_table(rows))
    records = [{
        'stage': r['stage'],
        'block': r['block'],
        'keys': r['keys'],
        **{
            name: r[name]
            for name in MEASURES
        }
    } for r in rows]
    if args.json:
        folder = osp.dirname(args.json)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(records, f, indent=1)
    shown = None
    if args.out_file:
        image = np.ascontiguousarray(shown_data['inputs'].permute(1, 2,
                                                                  0).numpy())
        result = per_image[args.map_image][location]
        H, W = result['record'].hw_shape
        stride = token_stride(backbone, location[0]) or image.shape[0] / H
        x, y = args.query if args.query else (image.shape[1] // 2,
                                              image.shape[0] // 2)
        r = min(H - 1, max(0, int(y // stride)))
        c = min(W - 1, max(0, int(x // stride)))
        shown = draw_figure(rows, image, result, location, args.head,
                            r * W + c, stride, args.out_file)
        print_log(f'Saved {args.out_file}.', logger='current')
    return dict(rows=rows, records=records, per_image=per_image, shown=shown)


if __name__ == '__main__':
    main()
