"""``recjax data prepare SOURCE OUT``: read interactions, k-core filter, write per-user sequences.

``SOURCE`` is an interactions file (MovieLens ``u.data`` / ``ratings.dat`` / ``ratings.csv``,
Amazon ``*.json[.gz]`` / ``*.csv``, RecBole ``*.inter``; see :mod:`recjax.data.seq_readers`)
or the word ``synthetic`` (the latent-interest generator of :mod:`recjax.data.seq_synthetic`).
``OUT`` receives the directory described in :mod:`recjax.data.seq_prepare`; train on it with
``data.source=sequences data.sequences.path=OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="interactions file, or 'synthetic'")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--format", default="auto", choices=["auto", "movielens", "amazon", "recbole"],
                   help="reader (default: from the file name)")
    p.add_argument("--k-core", type=int, default=0,
                   help="keep only users and items with at least K interactions, iterated (0 = all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    g = p.add_argument_group("synthetic source")
    g.add_argument("--num-users", type=int, default=None)
    g.add_argument("--num-items", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from recjax.config import SyntheticSequenceConfig
    from recjax.data.seq_prepare import build_sequences, describe_file, k_core, save_sequences
    from recjax.data.seq_readers import Interactions, read_interactions

    t0 = time.perf_counter()
    if args.source == "synthetic":
        from recjax.data.seq_synthetic import generate_sequences

        overrides = {k: getattr(args, k) for k in ("num_users", "num_items", "seed") if getattr(args, k) is not None}
        cfg = SyntheticSequenceConfig(**overrides)
        data = generate_sequences(cfg)
        description, fmt = f"synthetic latent-interest sequences (seed {cfg.seed})", "synthetic"
        sources: list = [{"synthetic": dataclasses.asdict(cfg)}]
        before = {"users": data.num_users, "items": data.num_items, "interactions": data.num_interactions}
        t_read = time.perf_counter() - t0
        if args.k_core > 1:
            inter = Interactions.from_raw(np.repeat(np.array(data.user_ids), data.lengths),
                                          np.array(data.item_ids)[data.items - 1], data.timestamps)
            data = build_sequences(k_core(inter, args.k_core))
    else:
        inter = read_interactions(args.source, args.format)
        description, fmt = inter.source, inter.fmt
        sources = [describe_file(args.source)]
        before = inter.counts()
        t_read = time.perf_counter() - t0
        data = build_sequences(k_core(inter, args.k_core))
    manifest = {
        "sources": sources,
        "reader": {"format": fmt, "description": description},
        "k_core": args.k_core,
        "before_filter": before,
        "after_filter": {"users": data.num_users, "items": data.num_items, "interactions": data.num_interactions},
    }
    path = save_sequences(args.out, data, manifest, overwrite=args.overwrite)
    stats = data.length_stats()
    print(f"source        {description}")
    print(f"read          {before['users']:,} users, {before['items']:,} items, "
          f"{before['interactions']:,} interactions in {t_read:.1f}s")
    if args.k_core > 1:
        print(f"{args.k_core}-core        {data.num_users:,} users, {data.num_items:,} items, "
              f"{data.num_interactions:,} interactions")
    print(f"users         {data.num_users:,}")
    print(f"items         {data.num_items:,}")
    print(f"interactions  {data.num_interactions:,}")
    print(f"length        min {stats['min']}, median {stats['median']:g}, mean {stats['mean']:.1f}, "
          f"max {stats['max']}")
    print(f"time          {time.perf_counter() - t0:.1f}s")
    print(f"manifest      {path}")
    return 0
