"""Training time of `model.py` under each `--strategy`, on this machine.

Runs `python model.py` (built-in corpus unless `--corpus`; extra flags are
passed on) as

- `none`: one device;
- `mirrored-1`: MirroredStrategy over the one CPU device;
- `mirrored-2`: MirroredStrategy over 2 logical CPU devices (the CPU split
  in two with `tf.config.set_logical_device_configuration`);
- `workers-2`: MultiWorkerMirroredStrategy, 2 worker processes on
  127.0.0.1 (`TF_CONFIG` on free ports),

interleaved, `--repeats` times, and prints the median seconds per epoch
(the `N epochs in S s` of `model.py`'s summary line: training, validation
and the final evaluation, without start-up).

Usage:
    python bench/data_parallel.py --repeats 3 -- --epochs 3 --patience 9
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TWO_LOGICAL_CPUS = """
import runpy, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
sys.argv[0] = "model.py"
runpy.run_path("model.py", run_name="__main__")
"""
SUMMARY = re.compile(r"(\d+) epochs in ([\d.]+) s")


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _seconds_per_epoch(stdout: str) -> float:
    match = SUMMARY.search(stdout)
    if not match:
        raise RuntimeError(f"no summary line in: {stdout[-2000:]}")
    return float(match.group(2)) / int(match.group(1))


def run(setup: str, flags: list[str], output: str) -> float:
    flags = [*flags, "--output", output]
    if setup == "none":
        commands = [[sys.executable, "model.py", *flags]]
    elif setup == "mirrored-1":
        commands = [[sys.executable, "model.py", *flags, "--strategy",
                     "mirrored"]]  # fmt: skip
    elif setup == "mirrored-2":
        commands = [[sys.executable, "-c", TWO_LOGICAL_CPUS, *flags,
                     "--strategy", "mirrored"]]  # fmt: skip
    else:
        commands = [
            [sys.executable, "model.py", *flags, "--strategy", "multi-worker"]
        ] * 2
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs, logs = [], []
    try:
        for index, command in enumerate(commands):
            env = dict(os.environ)
            if setup == "workers-2":
                task = {"type": "worker", "index": index}
                env["TF_CONFIG"] = json.dumps(
                    {"cluster": cluster, "task": task}
                )
            # Files, not pipes: a worker blocked on a full pipe would stall
            # its peers in the next collective.
            logs.append(tempfile.TemporaryFile("w+"))
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=env,
                    text=True,
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                )
            )
        for p in procs:
            p.wait(timeout=1800)
        outs = []
        for log in logs:
            log.seek(0)
            outs.append(log.read())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    for p, out in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"{setup} failed: {out[-2000:]}")
    return _seconds_per_epoch(outs[0])  # the chief's


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--setups",
        nargs="+",
        default=["none", "mirrored-1", "mirrored-2", "workers-2"],
    )
    parser.add_argument("flags", nargs="*", help="model.py flags, after --")
    args = parser.parse_args()
    times = {s: [] for s in args.setups}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for setup in args.setups:
                times[setup].append(run(setup, args.flags, f"{tmp}/{setup}"))
                print(f"{setup}: {times[setup][-1]:.2f} s/epoch", flush=True)
    base = statistics.median(times[args.setups[0]])
    print(f"\n| setup | s/epoch (median of {args.repeats}) | vs first |")
    print("|---|---|---|")
    for setup, values in times.items():
        median = statistics.median(values)
        print(f"| {setup} | {median:.2f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
