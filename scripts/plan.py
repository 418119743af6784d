"""Will a federated round fit? Compile it on shapes alone and read XLA's own accounting.

    python scripts/plan.py --model llama2-7b --clients 8 --batch 8 --seq 512 \
        --mesh clients=2,fsdp=4 [--remat layer] [--dtype bfloat16] [--algorithm fedit]
    python scripts/plan.py --table [--models llama2-7b,llama2-70b] [--cache DIR]
        # the docs/scaling.md tables (every clients x fsdp mesh of 4, 8 and 16 devices); with
        # --cache each (model, device count) sweep is kept in DIR and reused by later calls

No weights are read: the base, the states and the batches are ``jax.ShapeDtypeStruct``s, the
round phase (the engine's own traced phase, jitted with the mesh's shardings) is lowered and
compiled for fake CPU devices, and the script prints per device:

- memory: XLA's buffer assignment (``compiled.memory_analysis()``): arguments + outputs - donated
  aliases + temporaries. It is what the program's buffers need; it leaves out the runtime's own
  reserve (CUDA context and cuBLAS/cuDNN workspaces, ~0.5-1 GiB per GPU; jax preallocates 75% of
  GPU memory unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says more) and differences in how the
  GPU/TPU compilers fuse and lay out (TPU pads minor dims to tiles of 128). Hence the 90% rule.
- FLOPs: every ``dot`` of the optimised HLO (2 * output size * contracted size), multiplied by
  the trip counts of the loops around it (XLA's ``cost_analysis()`` counts a loop body once, so
  it undercounts a scanned model by layers x steps; it is printed beside for comparison).
- collectives: bytes per device of every all-gather / reduce-scatter / all-reduce / all-to-all /
  collective-permute (the larger of its input and output), times the trip counts around it.

Fake devices stand in for accelerators: set by this script before jax starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Model shapes that need no download (config.json of the hub releases, transcribed).
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
    ),  # HuggingFaceTB/SmolLM2-135M config.json
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128,
    ),  # meta-llama/Llama-2-7b-hf config.json
    "llama2-70b": dict(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128,
    ),  # meta-llama/Llama-2-70b-hf config.json
}  # fmt: skip

# HBM per device from the vendors' spec pages (cited in docs/scaling.md): (name, devices, bytes).
HARDWARE: tuple[tuple[str, int, float], ...] = (
    ("H100-80G x8 (1 node)", 8, 80e9),
    ("H200 x8 (1 node)", 8, 141e9),
    ("TPU v4-32 (16 chips)", 16, 32 * 2**30),
    ("TPU v5e-16 (16 chips)", 16, 16e9),
    ("TPU v5p-8 (4 chips)", 4, 95e9),
    ("TPU v5p-16 (8 chips)", 8, 95e9),
    ("TPU v5p-32 (16 chips)", 16, 95e9),
)
FIT_FRACTION = 0.9
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip


class PlanError(ValueError):
    """A bad planner argument (named in one line)."""


# ----------------------------------------------------------------------------- HLO accounting


_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _array_bytes(type_str: str) -> int:
    total = 0
    for dt, dims in _SHAPE.findall(type_str):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _DTYPE_BYTES.get(dt, 1)
    return total


def _dims(type_str: str) -> list[int]:
    m = _SHAPE.search(type_str)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _split_instruction(line: str) -> tuple[str, str, str, str] | None:
    """(name, result type, opcode, rest) of one HLO instruction line, or None."""
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # tuple type: up to the matching parenthesis
        depth = 0
        i = 0
        for i, ch in enumerate(rest):  # noqa: B007  (i is used after the loop)
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        type_str, rest = rest[: i + 1], rest[i + 1 :].lstrip()
    else:
        type_str, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    return m.group(1), type_str, op.group(1), rest[op.end() :]


@dataclass
class HloStats:
    """Per-device totals of one compiled SPMD program, loops expanded by their trip counts."""

    dot_flops: float = 0.0
    collective_bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    collective_count: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    unknown_trip_counts: int = 0


def hlo_stats(text: str) -> HloStats:
    """Dot FLOPs and collective bytes of an optimised HLO module's text (``compiled.as_text()``)."""
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    types: dict[str, str] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        parsed = _split_instruction(line) if current else None
        if parsed:
            comps[current].append(parsed)
            types[parsed[0]] = parsed[1]
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    stats = HloStats()

    def visit(comp: str, mult: float) -> None:
        for _name, type_str, op, rest in comps.get(comp, ()):
            trip = _TRIP.search(rest)
            if op == "while" and not trip:
                stats.unknown_trip_counts += 1
            for kind, callee in _CALLEE.findall(rest):
                factor = int(trip.group(1)) if (op == "while" and trip and kind == "body") else 1
                visit(callee, mult * factor)
            for branch in re.findall(r"branch_computations=\{([^}]*)\}", rest):
                for callee in re.findall(r"%?([\w.\-]+)", branch):
                    visit(callee, mult)
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            if op == "dot":
                lhs = _dims(types.get(operands[0], "")) if operands else []
                contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                k = math.prod(lhs[int(i)] for i in contract.group(1).split(",") if i)
                stats.dot_flops += mult * 2 * math.prod(_dims(type_str)) * k
            base_op = op.removesuffix("-start")
            if base_op in COLLECTIVES:
                ins = sum(_array_bytes(types.get(o, "")) for o in operands)
                out = _array_bytes(type_str) - (ins if op.endswith("-start") else 0)
                stats.collective_bytes[base_op] += mult * max(ins, out)
                stats.collective_count[base_op] += mult

    visit(entry, 1.0)
    return stats


# ----------------------------------------------------------------------------- the round


def model_config(spec: str) -> Any:
    from fedlora_jax.model.config import LlamaConfig
    from fedlora_jax.model.convert import read_hf_config
    from fedlora_jax.model.hub import locate

    if spec.lower() in PRESETS:
        return LlamaConfig(**PRESETS[spec.lower()])
    if pathlib.Path(spec).is_dir():
        return read_hf_config(spec)
    if spec.lower() == "stories260k":
        return read_hf_config(locate(spec)[0])
    raise PlanError(
        f"--model {spec!r}: not a preset ({', '.join(['stories260k', *PRESETS])}) "
        "nor a folder with config.json"
    )


@dataclass(frozen=True)
class Plan:
    mesh: dict[str, int]
    memory: dict[str, int]  # per device, max over phases
    peak_bytes: int
    dot_flops: float  # per device, summed over phases
    cost_analysis_flops: float
    collective_bytes: dict[str, float]
    batch_spec: str


def plan_round(
    cfg: Any,
    mesh_axes: dict[str, int],
    *,
    clients: int,
    batch: int,
    seq: int,
    steps: int = 1,
    remat: str = "layer",
    dtype: str = "bfloat16",
    algorithm: str = "fedit",
    rank: int = 16,
    targets: str = "qv",
) -> Plan:
    """Compile every phase of one round for ``mesh_axes`` and add up XLA's accounting."""
    import jax
    import jax.numpy as jnp

    from fedlora_jax import algorithms
    from fedlora_jax.adapters.base import AdapterConfig
    from fedlora_jax.algorithms import ClientTraining
    from fedlora_jax.federated import distributed as dist
    from fedlora_jax.federated import engine
    from fedlora_jax.model.llama import init_random_base

    spec = ",".join(f"{a}={n}" for a, n in mesh_axes.items())
    config = engine.EngineConfig(backend="mesh", mesh=spec)
    mesh = dist.mesh_of(spec)
    training = ClientTraining(
        model=cfg,
        adapter=AdapterConfig(r=rank, targets=targets),
        local_steps=steps,
        compute_dtype="bfloat16" if dtype == "bfloat16" else "float32",
        remat=remat,
    )
    alg = algorithms.get(algorithm)(training)
    key = jax.random.PRNGKey(0)
    base = jax.eval_shape(lambda: init_random_base(key, cfg, jnp.dtype(dtype)))
    server, states = jax.eval_shape(lambda b: alg.init(key, b, clients), base)
    rep = dist.named(mesh, jax.sharding.PartitionSpec())
    bspec = dist.batch_spec(mesh, batch)

    def placed(x: Any, sharding: Any) -> Any:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    base = jax.tree.map(placed, base, dist.base_sharding(mesh, base))
    server = jax.tree.map(lambda x: placed(x, rep), server)
    states = jax.tree.map(lambda x: placed(x, dist.named(mesh, dist.state_spec(mesh, x))), states)
    memory: dict[str, int] = defaultdict(int)
    peak = 0
    flops = cost_flops = 0.0
    coll: dict[str, float] = defaultdict(float)
    for p, phase in enumerate(alg.phases):
        batch_shape = jax.ShapeDtypeStruct(
            (clients, phase.steps, batch, seq), jnp.int32, sharding=dist.named(mesh, bspec)
        )
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        args = (
            base, server, states,
            jax.ShapeDtypeStruct((clients,), jnp.int32, sharding=rep),
            dict.fromkeys(engine.BATCH_KEYS, batch_shape),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep), scalar, scalar,
            jax.ShapeDtypeStruct((clients,), jnp.float32, sharding=rep),
        )  # fmt: skip
        with jax.set_mesh(mesh):  # the engine's own compiled phase, as a run would build it
            lowered = engine.compiled_phase(alg, p, config, clients).lower(*args)
        compiled = lowered.compile()
        ma = compiled.memory_analysis()
        fields = ("argument", "output", "alias", "temp", "generated_code")
        phase_mem = {f: int(getattr(ma, f"{f}_size_in_bytes")) for f in fields}
        phase_peak = (
            phase_mem["argument"] + phase_mem["output"] - phase_mem["alias"] + phase_mem["temp"]
        )
        if phase_peak > peak:
            peak, memory = phase_peak, phase_mem
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        cost_flops += float(ca.get("flops", 0.0))
        stats = hlo_stats(compiled.as_text())
        flops += stats.dot_flops
        for k, v in stats.collective_bytes.items():
            coll[k] += v
    return Plan(dict(mesh_axes), dict(memory), peak, flops, cost_flops, dict(coll), str(bspec))


# ----------------------------------------------------------------------------- output


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def _size(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def describe(plan: Plan, n_devices: int) -> str:
    mesh = ",".join(f"{a}={n}" for a, n in plan.mesh.items())
    m = plan.memory
    lines = [
        f"mesh {mesh} ({n_devices} devices), batches {plan.batch_spec}",
        f"  memory per device: {_size(plan.peak_bytes)} = arguments {_size(m['argument'])} + "
        f"outputs {_size(m['output'])} - donated {_size(m['alias'])} + temporaries "
        f"{_size(m['temp'])}",
        f"  FLOPs per round: {plan.dot_flops:.3e} per device, {plan.dot_flops * n_devices:.3e} "
        f"all devices (dots, loops expanded; XLA cost_analysis: {plan.cost_analysis_flops:.3e})",
    ]
    for k, v in sorted(plan.collective_bytes.items()):
        lines.append(f"  {k}: {_size(v)} per device per round")
    if not plan.collective_bytes:
        lines.append("  no collectives")
    return "\n".join(lines)


def meshes_for(n_devices: int, clients: int) -> list[dict[str, int]]:
    """clients x fsdp splits of ``n_devices`` with the clients axis dividing K."""
    return [
        {"clients": c, "fsdp": n_devices // c}
        for c in range(1, n_devices + 1)
        if n_devices % c == 0 and clients % c == 0
    ]


COMMON_FLAGS = (
    "clients",
    "batch",
    "seq",
    "steps",
    "remat",
    "dtype",
    "algorithm",
    "rank",
    "targets",
)


def sweep(args: argparse.Namespace, n_devices: int) -> list[Plan]:
    """Plans of every clients x fsdp mesh of ``n_devices`` for ``args.model`` (own process: the
    fake device count is fixed when jax starts); kept in / read from ``args.cache`` if set."""
    cmd = [sys.executable, __file__, "--model", args.model, "--sweep", str(n_devices)]
    for flag in COMMON_FLAGS:
        cmd += [f"--{flag}", str(getattr(args, flag))]
    cached = None
    if args.cache:
        tag = "-".join(str(getattr(args, f)) for f in COMMON_FLAGS)
        cached = pathlib.Path(args.cache) / f"{args.model}-{n_devices}-{tag}.json"
        if cached.is_file():
            return [Plan(**d) for d in json.loads(cached.read_text())]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise PlanError(
            f"planning {args.model} on {n_devices} devices failed: {proc.stderr[-2000:]}"
        )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(proc.stdout)
    return [Plan(**d) for d in json.loads(proc.stdout)]


def docs_table(args: argparse.Namespace) -> str:
    """The docs/scaling.md tables: the best fitting mesh per hardware, then every mesh."""
    best_rows = [
        "| model | hardware | HBM/device | fits | best mesh | memory/device (GB) | "
        "collectives (GB/device/round) | TFLOP/round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    all_rows = [
        "| model | devices | mesh | memory/device (GB) | all-gather | all-reduce | other "
        "collectives | TFLOP/round (all devices) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models.split(","):
        plans = {
            n: sweep(argparse.Namespace(**{**vars(args), "model": name}), n)
            for n in sorted({hw[1] for hw in HARDWARE})
        }
        for n, ps in plans.items():
            for p in ps:
                print(f"[{name}] {describe(p, n)}", file=sys.stderr, flush=True)
                c = p.collective_bytes
                other = sum(v for k, v in c.items() if k not in ("all-gather", "all-reduce"))
                all_rows.append(
                    f"| {name} | {n} | {_mesh_text(p.mesh)} | {_gb(p.peak_bytes)} | "
                    f"{_gb(c.get('all-gather', 0))} | {_gb(c.get('all-reduce', 0))} | "
                    f"{_gb(other)} | {p.dot_flops * n / 1e12:.0f} |"
                )
        for hw, n, hbm in HARDWARE:
            fitting = [p for p in plans[n] if p.peak_bytes <= FIT_FRACTION * hbm]
            pool = fitting or plans[n]
            key = (lambda p: sum(p.collective_bytes.values())) if fitting else (
                lambda p: p.peak_bytes
            )  # fmt: skip
            best = min(pool, key=key)
            shown = _mesh_text(best.mesh) if fitting else f"(least memory: {_mesh_text(best.mesh)})"
            best_rows.append(
                f"| {name} | {hw} | {hbm / 1e9:.0f} GB | {'yes' if fitting else 'no'} | {shown}"
                f" | {_gb(best.peak_bytes)} | {_gb(sum(best.collective_bytes.values()))} | "
                f"{best.dot_flops * n / 1e12:.0f} |"
            )
    return "\n".join(best_rows) + "\n\n" + "\n".join(all_rows)


def _mesh_text(mesh: dict[str, int]) -> str:
    return ",".join(f"{a}={v}" for a, v in mesh.items())


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="stories260k", help="preset or HF folder")
    ap.add_argument("--mesh", default="clients=1,fsdp=1", help="e.g. clients=2,fsdp=4")
    ap.add_argument("--clients", type=int, default=8, help="K clients per round")
    ap.add_argument("--batch", type=int, default=8, help="rows per client step")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1, help="local steps per round")
    ap.add_argument("--remat", default="layer", help="none | layer | dots_saveable")
    ap.add_argument("--dtype", default="bfloat16", help="base and compute dtype")
    ap.add_argument("--algorithm", default="fedit")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="qv")
    ap.add_argument("--table", action="store_true", help="the docs/scaling.md tables")
    ap.add_argument("--models", default="llama2-7b,llama2-70b", help="--table: model presets")
    ap.add_argument("--cache", default="", help="--table: keep each sweep's plans in this folder")
    ap.add_argument("--sweep", type=int, default=0, help=argparse.SUPPRESS)  # used by --table
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.table:  # each device count planned in its own process
            print(docs_table(args))
            return 0
        sizes = [int(n) for n in re.findall(r"=\s*(\d+)", args.mesh)]
        if "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            # Fake devices must be asked for before jax starts: exactly the mesh's.
            need = args.sweep or math.prod(sizes)
            os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={need}"
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from fedlora_jax.federated.distributed import parse_mesh

        cfg = model_config(args.model)
        kwargs = {flag: getattr(args, flag) for flag in COMMON_FLAGS}
        if args.sweep:
            plans = [plan_round(cfg, m, **kwargs) for m in meshes_for(args.sweep, args.clients)]
            print(json.dumps([dataclasses.asdict(p) for p in plans]))
            return 0
        mesh = parse_mesh(args.mesh, "--mesh")
        print(describe(plan_round(cfg, mesh, **kwargs), math.prod(mesh.values())))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
