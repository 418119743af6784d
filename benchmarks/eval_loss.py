"""The evaluation loss, packed against unpacked, on the default run's test sets.

    PYTHONPATH=. python benchmarks/eval_loss.py --threads 2 [--max-examples 16]

Builds the embedded default run (``configs/dolly.py``: SmolLM2-135M, 4 clients x 8 Dolly test
rows, rows up to 256 tokens), takes its initial global and personal adapters and times the loss
part of one ``evaluate`` call in both layouts — global + personal sections, as ``evaluate`` runs
them: host assembly of the rows, the vmapped per-token-NLL program over the K lanes, and the
host's per-example sums. Packed: each lane's examples first fit, longest first, into rows of the
bucketed longest length; unpacked (``packing=False``): one example per row, ``eval.batch_size``
rows per call. The first call (compilation included) and the fastest of ``--repeats`` later calls
(the layouts alternate call by call) are printed with the slots each layout computes, the
largest relative difference of the per-example sums between the layouts, and the packed ÷
unpacked ratio, all from one process. ``--max-examples`` overrides
``eval.max_examples_per_client`` (the default run's is 8).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import bench_measure as measure


def _loss_part(setup, global_, personal, tests, rc, packing: bool):
    """A closure running the loss part of ``evaluate`` (global, and personal unless None), and
    the layout's shape figures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fedlora_jax.eval import harness as H

    every = [ex for s in tests for ex in s]
    k = len(tests)
    seq_len = H._bucket(max(len(ex.tokens) for ex in every))
    owners = [i for i, s in enumerate(tests) for _ in s]
    groups = {"global": [list(range(len(every)))[i::k] for i in range(k)]}
    adapters = {"global": H._replicate(global_, k)}
    if personal is not None:
        groups["personal"] = [[j for j, o in enumerate(owners) if o == i] for i in range(k)]
        adapters["personal"] = personal
    rows = {
        n: H._packed_rows(g, every, seq_len) if packing else H._single_rows(g)
        for n, g in groups.items()
    }
    batch_size = rc.eval.batch_size
    per_call = H._rows_per_call(list(rows.values()), batch_size) if packing else batch_size
    shapes = H._Shapes(batch=batch_size, prompt_len=0, seq_len=seq_len, loss_rows=per_call)
    cfg = setup.model_cfg
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_ids[0]
    fn = H._loss_fn(cfg, setup.training.adapter, jnp.dtype(rc.model.compute_dtype))

    def run() -> dict[tuple[str, int], tuple[float, int]]:
        out, pending = {}, []
        for name, section_rows in rows.items():
            for call in H._loss_calls(section_rows, every, shapes, pad_id):
                pending.append((name, call, fn(setup.base, adapters[name], call.tokens,
                                                call.segments)))  # fmt: skip
        for name, call, nll in pending:
            for i, v in H._example_losses(call, np.asarray(jax.block_until_ready(nll))).items():
                out[(name, i)] = v
        return out

    calls = sum(len(H._loss_calls(r, every, shapes, pad_id)) for r in rows.values())
    slots = calls * k * per_call * seq_len
    real = len(groups) * sum(len(ex.tokens) for ex in every)
    return run, {"calls": calls, "rows_per_call": per_call, "seq_len": seq_len, "slots": slots,
                 "efficiency": real / slots}  # fmt: skip


def _interleaved(runs: dict, repeats: int) -> tuple[dict, dict, dict]:
    """(first call s, fastest of ``repeats`` later calls s, result) per run; the runs alternate
    call by call, so a change in the machine's load hits both alike."""
    first, best, result = {}, {}, {}
    for rnd in range(repeats + 1):
        for name, fn in runs.items():
            t = time.perf_counter()
            result[name] = fn()
            took = time.perf_counter() - t
            if rnd == 0:
                first[name] = took
            else:
                best[name] = min(best.get(name, took), took)
    return first, best, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/dolly.py")
    p.add_argument("--threads", type=int, default=None, help="pin to this many CPUs")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per layout after the first")
    p.add_argument(
        "--max-examples", type=int, default=None, help="eval.max_examples_per_client (0 = all)"
    )
    args = p.parse_args(argv)
    measure.pin_threads(args.threads)

    from fedlora_jax import config as config_lib
    from fedlora_jax import runner
    from fedlora_jax.federated.engine import init_state
    from fedlora_jax.federated.engine import models as engine_models

    cfg = config_lib.load_config(args.config)
    if args.max_examples is not None:
        cfg.eval.max_examples_per_client = args.max_examples
    rc = config_lib.typed(cfg)
    setup = runner.build(cfg, verbose=False)
    k = len(setup.data.clients)
    state = init_state(setup.algorithm, setup.base, k, seed=0)
    models = engine_models(setup.algorithm, state, k, setup.engine)
    tests = runner.client_test_sets(setup.data, rc.eval.max_examples_per_client)
    personal = None if models.personal_is_global else models.personal  # as the runner does
    print(f"{args.config}: {k} clients, test splits {[len(t) for t in tests]}, "
          f"batch {rc.eval.batch_size}, load average {os.getloadavg()}")  # fmt: skip

    runs, infos = {}, {}
    for name, packing in (("unpacked", False), ("packed", True)):
        runs[name], infos[name] = _loss_part(setup, models.global_, personal, tests, rc, packing)
    first, best, results = _interleaved(runs, args.repeats)
    for name, info in infos.items():
        print(f"loss {name:8s}: first {first[name]:6.1f} s, fastest of {args.repeats} "
              f"{best[name]:6.1f} s; {info['calls']} calls x {k} lanes x {info['rows_per_call']} "
              f"rows x {info['seq_len']} = {info['slots']} slots, "
              f"{info['efficiency']:.2f} real tokens / slot")  # fmt: skip
    plain, packed = results["unpacked"], results["packed"]
    slots = infos["packed"]["slots"] / infos["unpacked"]["slots"]
    diff = max(abs(packed[key][0] - v[0]) / abs(v[0]) for key, v in plain.items())
    assert all(packed[key][1] == v[1] for key, v in plain.items())
    print(f"loss packed / unpacked: time {best['packed'] / best['unpacked']:.2f}, slots "
          f"{slots:.2f} (per-example sums agree to {diff:.1e} relative, token counts "
          f"exactly); load average {os.getloadavg()}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
