"""Data for a surrogate of the default search space: random architectures through the default
proxy, and their latency measured in one sitting (issue #21, item 1).

    python benchmarks/surrogate_data.py --data ../shared/datasets/cifar10-jpg.tar.gz \\
        --archs 300 [--phase train|latency|both] [--out benchmarks/results/surrogate_mnasnet.csv]

Architectures are drawn by Optuna's RandomSampler (--seed) from the default space, as a
search's start-up trials are. Phase `train` trains each with the default ProxyBudget (seed 0,
the validation split nas.search scores on) and records accuracy, parameters, multiply-adds and
seconds; phase `latency` then measures every trained architecture in the default runtime (1
thread, 224x224), in a shuffled order, all in one sitting: latency is not measured beside
training, which would disturb it. Every result goes to the CSV at once, so an interrupted run
resumes where it stopped, and the runs may be spread over several sessions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import optuna
import pandas as pd

from nas.arch import Architecture
from nas.cost import count_macs, count_params
from nas.data import SPLIT_SEED, load_data, split_train_val
from nas.files import write_atomic
from nas.host import cpu_name
from nas.latency import measure_latency
from nas.model import build_model
from nas.proxy import CandidateFailed, ProxyBudget, proxy_train
from nas.runtimes import DEFAULT_RUNTIME
from nas.space import load_space

COLUMNS = ["index", "arch", "arch_dict", "params", "macs", "accuracy", "train_s", "fail_reason",
           "latency_ms", "latency_cv", "runtime", "latency_device", "budget"]


def sample(n: int, seed: int) -> list[Architecture]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space("mnasnet")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


def load(out: Path) -> pd.DataFrame:
    if out.exists():
        return pd.read_csv(out)
    return pd.DataFrame(columns=COLUMNS)


def save(df: pd.DataFrame, out: Path) -> None:
    write_atomic(out, df.sort_values("index").to_csv(index=False))


def train_phase(archs: list[Architecture], df: pd.DataFrame, out: Path, data_source: str) -> \
        pd.DataFrame:
    data = load_data(data_source, val_size=0)
    budget = ProxyBudget()
    fit, val = split_train_val(data.train, val_size=budget.val_images, seed=SPLIT_SEED)
    data = dataclasses.replace(data, train=fit, val=val)
    done = set(df["index"].astype(int))
    for i, arch in enumerate(archs):
        if i in done:
            continue
        model = build_model(arch, num_classes=data.num_classes)
        row = {"index": i, "arch": arch.to_str(), "arch_dict": json.dumps(arch.to_dict()),
               "params": count_params(model), "macs": count_macs(model, 224),
               "budget": json.dumps(dataclasses.asdict(budget))}
        t0 = time.perf_counter()
        try:
            row["accuracy"] = proxy_train(arch, data, budget, seed=0).accuracy
        except CandidateFailed as e:
            row["fail_reason"] = str(e)
        row["train_s"] = time.perf_counter() - t0
        df = pd.concat([df, pd.DataFrame([row])], ignore_index=True)
        save(df, out)
        print(f"[{i + 1}/{len(archs)}] acc {row.get('accuracy', float('nan')):.4f} "
              f"{row['train_s']:.0f} s  {row['arch']}", flush=True)
    return df


def latency_phase(df: pd.DataFrame, out: Path, seed: int) -> pd.DataFrame:
    todo = [i for i in df.index if pd.isna(df.at[i, "latency_ms"])]
    random.Random(seed).shuffle(todo)
    for k, i in enumerate(todo):
        arch = Architecture.from_json(df.at[i, "arch_dict"])
        r = measure_latency(build_model(arch, num_classes=10), 224, runtime=DEFAULT_RUNTIME)
        df.loc[i, ["latency_ms", "latency_cv", "runtime", "latency_device"]] = [
            r.median_ms, r.cv, f"{r.context.runtime} {r.context.runtime_version}",
            cpu_name()]
        save(df, out)
        print(f"latency [{k + 1}/{len(todo)}] {r.median_ms:.2f} ms", flush=True)
    return df


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--archs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase", choices=("train", "latency", "both"), default="both")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/surrogate_mnasnet.csv"))
    args = p.parse_args()
    df = load(args.out)
    for col in COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=object)
    # Columns read back all empty come as float; the text ones must take strings.
    df = df.astype({"latency_ms": float, "latency_cv": float, "runtime": object,
                    "latency_device": object, "fail_reason": object}, errors="ignore")
    if args.phase in ("train", "both"):
        df = train_phase(sample(args.archs, args.seed), df, args.out, args.data)
    if args.phase in ("latency", "both"):
        latency_phase(df, args.out, args.seed)


if __name__ == "__main__":
    main()
