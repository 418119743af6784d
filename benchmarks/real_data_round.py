"""The real-data cell: one FedIT round on Dolly rows, ours (packed) against the PyTorch + PEFT
reference with per-batch dynamic padding (what HF's ``DataCollatorForSeq2Seq`` does).

    PYTHONPATH=. python benchmarks/real_data_round.py --clients 8 --threads 2 \
        --out benchmarks/results/real_data_cpu

The shipped Dolly rows are tokenised once with the SmolLM2 tokenizer (alpaca template, response
loss only) and dealt round-robin to K clients. Ours trains on ``packed_round_batches`` (S steps
× B rows × T slots, several examples per row). The reference trains on exactly the same examples
in the same steps — each step's examples, right-padded to the step's longest — so both sides
compute the same loss (mean NLL over the step's response tokens) and the same round (checked:
max |Δ| of the global adapter after round 1). Weights: the SmolLM2-135M shape with the grid's
random base (``bench_weights``); the timing does not depend on the values. ``--preset tiny``
(stories260K's shape and tokenizer) is what the test runs. Reported: real
(non-padding) tokens per second and ours ÷ reference round time, through ``federated_round``'s
cells (one fresh process per side).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import tempfile

import bench_measure as measure
import federated_round as grid
import numpy as np
from round_vs_loop import SMOLLM2

MiB = 2**20


def tokenizer_folder(preset: str) -> pathlib.Path:
    """SmolLM2's tokenizer (its offline copy) or the shipped stories260K's (``tiny``, tests)."""
    import fedlora_jax
    from fedlora_jax.model.hub import fetch_smollm2

    if preset == "smollm2":
        return fetch_smollm2()
    return pathlib.Path(fedlora_jax.__file__).parent / "resources" / "models" / "stories260k"


def dolly_clients(k: int, seq: int, rows: int, folder: pathlib.Path):
    """K TokenizedSets of the first ``rows`` shipped Dolly rows, dealt round-robin."""
    from fedlora_jax.data import load_dolly, tokenize_examples
    from fedlora_jax.model.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    examples = load_dolly(verbose=False).examples[:rows]
    ts = tokenize_examples(examples, tok, max_seq_len=seq)[0]
    return [ts.take(np.arange(i, len(ts), k)) for i in range(k)]


def packed_and_padded(clients, steps: int, batch: int, seq: int, seed: int):
    """(ours [K, S, B, T] packed, the reference's ragged ``k/s/name`` dict, real tokens)."""
    from fedlora_jax.data.batches import packed_round_batches, stack_clients

    packed = [
        packed_round_batches(
            c, steps=steps, batch_size=batch, seq_len=seq, seed=seed, round=0, client_id=i
        )  # fmt: skip
        for i, c in enumerate(clients)
    ]
    ragged = {}
    for i, b in enumerate(packed):
        for s in range(steps):
            segs = []
            for row in range(batch):
                seg = b["attn_mask"][s, row]
                for j in range(1, int(seg.max()) + 1):
                    idx = seg == j
                    segs.append((b["tokens"][s, row][idx], b["loss_mask"][s, row][idx]))
            width = max(len(t) for t, _ in segs)
            out = {n: np.zeros((len(segs), width), np.int32) for n in ("tokens", "loss_mask")}
            out["attn_mask"] = np.zeros((len(segs), width), np.int32)
            for r, (t, m) in enumerate(segs):
                out["tokens"][r, : len(t)], out["loss_mask"][r, : len(t)] = t, m
                out["attn_mask"][r, : len(t)] = 1
            ragged.update({f"{i}/{s}/{n}": x for n, x in out.items()})
    ours = stack_clients(packed)
    real = int((ours["attn_mask"] > 0).sum())
    assert real == sum(int(v.sum()) for n, v in ragged.items() if n.endswith("attn_mask"))
    pad_slots = sum(v.size for n, v in ragged.items() if n.endswith("attn_mask"))
    return ours, ragged, real, pad_slots


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="packed rows per step (ours)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rows", type=int, default=2000, help="Dolly rows tokenised")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after the first")
    p.add_argument("--threads", type=int)
    p.add_argument("--remat", choices=("off", "on"), default="off", help="both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true")
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args(argv)
    import jax

    from fedlora_jax.adapters import AdapterConfig, init_adapters, select_targets

    k, r = args.clients, 8
    cfg = SMOLLM2 if args.preset == "smollm2" else grid.PRESETS["tiny"].model
    meta = {
        "machine": grid.machine(),
        "threads": args.threads or len(os.sched_getaffinity(0)),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(["python", "benchmarks/real_data_round.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    clients = dolly_clients(k, args.seq, args.rows, tokenizer_folder(args.preset))
    ours, ragged, real, ref_slots = packed_and_padded(
        clients, args.steps, args.batch, args.seq, args.seed
    )
    acfg = AdapterConfig(kind="lora", r=r, alpha=2.0 * r, targets="qv")
    targets = sorted({p.rsplit(".", 1)[1] for p in select_targets(cfg.num_layers, acfg)})
    rows = []
    with tempfile.TemporaryDirectory(prefix="realdata_") as tmp:
        work = pathlib.Path(tmp)
        init_path = work / "init_adapters.npz"
        grid.adapters_to_npz(init_adapters(jax.random.PRNGKey(args.seed), cfg, acfg), init_path)
        np.savez(work / "ours.npz", **ours)
        np.savez(work / "ref.npz", **ragged)
        cell = {
            "hf": cfg.to_hf_dict(), "seed": args.seed, "dtype": "float32", "steps": args.steps,
            "rounds": args.rounds, "device": "cpu", "threads": args.threads, "chunk_size": 2,
            "init_adapters": str(init_path), "k": k, "remat": args.remat == "on",
            "hp": {n: grid.HP[n] for n in ("lr", "weight_decay", "grad_clip")},
            "lora": {"r": r, "alpha": acfg.alpha, "dropout": 0.0, "targets": "qv",
                     "target_modules": targets},
            "sizes": [float(len(c)) for c in clients],
        }  # fmt: skip
        sides = [("jax", "vmap", work / "ours.npz", k * args.steps * args.batch * args.seq)]
        sides.append(("torch", "loop", work / "ref.npz", ref_slots))
        for impl, backend, data, slots in sides:
            check = work / f"{impl}_round1.npz"
            spec = {**cell, "impl": impl, "backend": backend, "batches": str(data),
                    "check_out": str(check)}  # fmt: skip
            res = grid.run_cell(spec, args.in_process, work)
            rows.append(
                {
                    "impl": impl,
                    "k": k,
                    "steps": args.steps,
                    "round_s": res["round_s"],
                    "rounds_s": res["rounds_s"],
                    "first_s": res["first_s"],
                    "real_tokens": real,
                    "slots": slots,
                    "efficiency": real / slots,
                    "real_tokens_per_s": real / res["round_s"],
                    "peak_mib": res["peak_bytes"] / MiB,
                    "check": str(check),
                }  # fmt: skip
            )
            print(f"{impl}: round {res['round_s']:.2f}s, {real / res['round_s']:.0f} real tok/s, "
                  f"peak {res['peak_bytes'] / MiB:.0f} MiB", flush=True)  # fmt: skip
        got, want = np.load(rows[0]["check"]), dict(np.load(rows[1]["check"]))
        rows[0]["max_abs_diff_vs_ref"] = max(float(np.max(np.abs(got[n] - want[n]))) for n in want)
    rows[0]["ratio_vs_ref"] = rows[0]["round_s"] / rows[1]["round_s"]
    for row in rows:
        row.pop("check")
    meta["load_end"] = [round(x, 2) for x in os.getloadavg()]
    text = markdown(rows, meta, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        measure.write_json(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
    return rows


def markdown(rows: list[dict], meta: dict, args: argparse.Namespace) -> str:
    out = [
        f"Machine: {meta['machine']}; {meta['threads']} thread(s) per side; load average at "
        f"start {meta['load_start']}, at end {meta['load_end']}.",
        f"Command: `{meta['command']}`",
        "",
        f"{'SmolLM2-135M' if args.preset == 'smollm2' else 'stories260K'} shape, "
        f"K={args.clients}, {args.steps} steps per client, remat {args.remat}, Dolly rows "
        f"(max {args.seq} tokens), LoRA r=8 q,v, fp32.",
        "",
        "| impl | batches | slots | real tokens | real ÷ slots | round s | first s | real tokens/s "
        "| peak MiB | ours ÷ ref | max |Δ| vs ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = r["impl"] == "jax"
        label = "ours (packed, vmap)" if ours else "torch+PEFT (dynamic padding)"
        shape = f"{args.batch}×{args.seq} packed" if ours else "longest in step"
        ratio = f"{r['ratio_vs_ref']:.2f}" if ours else "–"
        diff = f"{r['max_abs_diff_vs_ref']:.1e}" if ours else "–"
        out.append(
            f"| {label} | {shape} | {r['slots']} | {r['real_tokens']} | {r['efficiency']:.2f} | "
            f"{r['round_s']:.3g} | {r['first_s']:.3g} | {r['real_tokens_per_s']:.0f} | "
            f"{r['peak_mib']:.0f} | {ratio} | {diff} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
