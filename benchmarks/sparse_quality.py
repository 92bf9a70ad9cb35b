"""Does sparse attention keep the quality of dense attention at a fraction of its cost?

    python benchmarks/sparse_quality.py [--steps 300 --probe-steps 150 --clips 8 --tokens-per-clip 16]

Pretrains the tiny model on the synthetic data at a long token sequence (clips x tokens per clip
per modality) twice through launch/pretrain.py, dense and sparse (block-sparse attention plus
node sparsity), then linear-probes each (launch/finetune.py, backbone frozen) on held-out videos.
Reports the probe top-1, the final correct-pair accuracy of pretraining, the attention cost of
one forward (query-key pairs over all three transformers and layers, node sparsity included) and
the time taken. Writes a table and a plot to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

from pretraining_evidence import HERE, launch, probe_accuracy

SPARSE = {"model.attention.kind": "block_sparse", "model.attention.block_size": 8,
          "model.attention.local_window": 1, "model.attention.random_blocks": 1,
          "model.node_sparsity.keep_rate": 0.7, "model.node_sparsity.after_layers": "[1]"}


def attention_pairs(tokens: int, layers: int, sparse: bool) -> int:
    """Query-key pairs of one forward: visual, audio and multimodal transformers, every layer."""
    from pemt.model.sparse_attention import BlockSparsity
    from pemt.model.sparse_attention import attention_pairs as pairs

    spec = BlockSparsity(int(SPARSE["model.attention.block_size"]), 1, 1) if sparse else None
    keep = SPARSE["model.node_sparsity.keep_rate"] if sparse else 1.0
    total = 0
    for layer in range(layers):
        visual = tokens if layer == 0 else math.ceil(keep * tokens)   # pruned after layer 1
        total += pairs(visual, 1, spec) + pairs(tokens, 1, spec)        # visual, audio transformers
        total += pairs(visual + tokens, 2, spec)                        # multimodal
    return total


def final_pair_accuracy(run_id: str, root: Path) -> float:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{root}/mlflow.db").get_metric_history(run_id, "pair_accuracy")
    last = sorted(history, key=lambda m: m.step)[-3:]
    return 100.0 * sum(m.value for m in last) / len(last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=HERE.parent / "outputs" / "sparse_quality")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--probe-steps", type=int, default=150)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--tokens-per-clip", type=int, default=16)
    parser.add_argument("--videos", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    common = [f"paths.root={args.root}", f"data.synthetic.videos={args.videos}", "data.synthetic.classes=8",
              f"data.clips={args.clips}", f"model.tokens_per_clip={args.tokens_per_clip}", f"seed={args.seed}",
              "data.synthetic.seconds=4.0", "data.fps=16", "mlflow.system_metrics=false"]
    tokens = args.clips * args.tokens_per_clip
    rows = []
    with tqdm(total=4, desc="quality runs") as progress:
        for kind in ("dense", "sparse"):
            extra = [f"{k}={v}" for k, v in SPARSE.items()] if kind == "sparse" else []
            _, run_id, pretrain_s = launch("pretrain.py", [*common, *extra, f"train.max_steps={args.steps}",
                                                           f"train.checkpoint_every={args.steps}"])
            progress.update()
            probe_dir, _, probe_s = launch("finetune.py", [*common, f"task.init={run_id}", "task.freeze=[backbone]",
                                                           f"train.max_steps={args.probe_steps}",
                                                           f"train.checkpoint_every={args.probe_steps}"])
            progress.update()
            rows.append({"kind": kind, "pairs": attention_pairs(tokens, 2, kind == "sparse"),
                         "pretrain_s": pretrain_s, "probe_s": probe_s, "probe_top1": probe_accuracy(probe_dir),
                         "pair_accuracy": final_pair_accuracy(run_id, args.root)})
    dense, sparse = rows
    lines = [
        "# Sparse vs dense attention: quality at a long sequence (synthetic data)",
        "",
        f"{datetime.date.today()}, CPU, tiny model, seed {args.seed}; {args.clips} clips x {args.tokens_per_clip} "
        f"tokens per clip = {tokens} tokens per modality; pretraining {args.steps} steps x 8 videos of "
        f"{args.videos}, linear probe {args.probe_steps} steps, scored on 32 held-out videos. Sparse: blocks of 8, "
        "1 local block each side, 1 random block, BOS global; node sparsity keeps 70% of visual tokens after "
        "layer 1. Generated by `python benchmarks/sparse_quality.py`.",
        "",
        "| attention | query-key pairs per forward | vs dense | pretrain time (s) | pair accuracy (%) | probe top-1 (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['pairs']:,} | {r['pairs'] / dense['pairs']:.2f} | {r['pretrain_s']:.0f} "
                     f"| {r['pair_accuracy']:.1f} | {r['probe_top1']:.1f} |")
    lines += ["", f"Probe top-1, sparse minus dense: {sparse['probe_top1'] - dense['probe_top1']:+.1f} points at "
              f"{sparse['pairs'] / dense['pairs']:.2f} of the attention cost."]
    table = "\n".join(lines) + "\n"
    print(table)
    (HERE / "results" / "sparse_quality.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
