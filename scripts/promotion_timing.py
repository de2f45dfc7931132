"""Time promotions and rollbacks as an operator runs them: each `mlflow-clip promote` and
`mlflow-clip rollback` a fresh process, against a real `mlflow server` on PostgreSQL, every gate
on (the accuracy gate too, with accuracies recorded by `mlflow-clip evaluate`).

    python scripts/promotion_timing.py --postgres-uri postgresql://mlflow_clip:mlflow_clip@127.0.0.1:5432/mlflow_clip
    python scripts/promotion_timing.py --postgres-uri ... --model RN50 --promotions 6 --rollbacks 2

Creates a fresh database on that server, starts `mlflow server` on it, exports two versions
(the demo model, or a full-size architecture with random weights), evaluates both, then runs
the promotions (alternating between the two versions) and the rollbacks. Prints the median and
the worst wall time of each (process start to exit), each gate's and each phase's median and
worst as the commands printed them, side-by-side baselines for `history` and a refused
`--version 999` (a bare registry search and lookup in a fresh process), the CPU and the load,
and checks the history is a chain of done events with no lock ticket left. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "clip-zero-shot"
ALIAS = "production"
GATE_LINE = re.compile(r"^gate (?P<gate>[a-z ]+): passed in (?P<seconds>[\d.]+) s:", re.M)
PHASES = re.compile(r"\((?P<total>[\d.]+) s(?:: (?P<parts>[^)]*))?\)\s*$", re.M)
SEARCH = "import mlflow; mlflow.MlflowClient().search_model_versions(\"name='clip-zero-shot'\")"
LOOKUP = (
    "import mlflow\ntry:\n    mlflow.MlflowClient().get_model_version('clip-zero-shot', '999')\n"
    "except mlflow.exceptions.MlflowException:\n    pass"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-uri", required=True, help="a PostgreSQL server (a fresh database is created)")
    parser.add_argument("--promotions", type=int, default=120)
    parser.add_argument("--rollbacks", type=int, default=20)
    parser.add_argument("--model", default="demo", help="demo, or an OpenAI CLIP architecture with random weights")
    parser.add_argument("--work-dir", default=None, help="where the server's files go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write every measurement to this file")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="promotion-timing-"))
    work.mkdir(parents=True, exist_ok=True)
    server, url = _start_server(_fresh_database(args.postgres_uri), work)
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": url}
        env.pop("MLFLOW_REGISTRY_URI", None)
        versions = _two_evaluated_versions(args.model, work, env)
        report = {"cpu": _cpu(), "load_before": os.getloadavg(), "model": args.model, "tracking_uri": url}
        report["promotions"] = _repeat(args.promotions, lambda i: _promote(versions[i % 2], env))
        report["rollbacks"] = _repeat(args.rollbacks, lambda i: _command(["rollback", "--alias", ALIAS], env))
        report["baselines"] = _baselines(env)
        report["load_after"] = os.getloadavg()
        report["checks"] = _check_history(env, args.promotions + args.rollbacks)
        report["breakdown"] = _breakdown()
    finally:
        server.terminate()
        server.wait(timeout=30)
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def _fresh_database(uri: str) -> str:
    import sqlalchemy

    name = f"mlflow_clip_timing_{os.getpid()}_{int(time.time())}"
    engine = sqlalchemy.create_engine(uri, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return uri.rsplit("/", 1)[0] + "/" + name


def _start_server(backend: str, work: Path) -> tuple[subprocess.Popen, str]:
    import socket

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination"]
    argv += [str(work / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    process = subprocess.Popen(argv, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url + "/health", timeout=10).status_code == 200:
                return process, url
        except requests.RequestException:
            time.sleep(1)
    process.terminate()
    raise RuntimeError((work / "server.log").read_text()[-3000:])


def _two_evaluated_versions(model: str, work: Path, env: dict) -> list[str]:
    """Two versions of all nine demo classes (other templates), each with a recorded accuracy."""
    from mlflow_clip.demo_data import DEMO_CLASSES, write_image_folder

    write_image_folder(work / "val", 5, 0, size=(64, 64), fmt="png")
    source = model
    if model != "demo":
        from mlflow_clip.export.checkpoints import save_random_checkpoint

        source = str(save_random_checkpoint(model, work / f"{model.replace('/', '-')}.pt"))
    classes = ",".join(DEMO_CLASSES)
    versions = []
    for templates in ("photo", "none"):
        _command(["export", "--model", source, "--classes", classes, "--templates", templates], env, check=True)
        versions.append(str(len(versions) + 1))
        uri = f"models:/{NAME}/{versions[-1]}"
        _command(["evaluate", "--model-uri", uri, "--data", str(work / "val")], env, check=True)
    return versions


def _command(args: list[str], env: dict, check: bool = True) -> dict:
    """One `mlflow-clip` process: its wall time, and its CPU time with its children's (the probe)."""
    started, cpu = time.monotonic(), _children_cpu()
    done = subprocess.run([sys.executable, "-m", "mlflow_clip.cli", *args], env=env, capture_output=True, text=True)
    seconds, cpu = time.monotonic() - started, _children_cpu() - cpu
    if check and done.returncode != 0:
        raise RuntimeError(f"mlflow-clip {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "cpu": cpu, "returncode": done.returncode, **_printed(done.stdout)}


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _promote(version: str, env: dict) -> dict:
    return _command(["promote", "--version", version, "--alias", ALIAS, "--max-accuracy-drop", "1"], env)


def _printed(stdout: str) -> dict:
    """The gates' and phases' seconds, as the command printed them."""
    gates = {m["gate"]: float(m["seconds"]) for m in GATE_LINE.finditer(stdout)}
    phases = {}
    match = PHASES.search(stdout)
    if match:
        phases["total"] = float(match["total"])
        for part in (match["parts"] or "").split(", "):
            if part:
                name, value, _ = part.split(" ")
                phases[name] = float(value)
    return {"gates": gates, "phases": phases}


def _repeat(count: int, run) -> list[dict]:
    results = []
    for index in range(count):
        results.append(run(index))
        print(f"  {index + 1}/{count}: {results[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return results


def _baselines(env: dict, rounds: int = 5) -> dict:
    """history and a refused --version 999, each beside what it needs at least: a fresh
    interpreter that imports mlflow and makes the one registry call, alternating."""
    out = {"search": [], "history": [], "lookup": [], "promote 999": []}
    for _ in range(rounds):
        for name, argv, expect in (
            ("search", [sys.executable, "-c", SEARCH], 0),
            ("history", [sys.executable, "-m", "mlflow_clip.cli", "history", "--alias", ALIAS], 0),
            ("lookup", [sys.executable, "-c", LOOKUP], 0),
            ("promote 999", [sys.executable, "-m", "mlflow_clip.cli", "promote", "--version", "999"], 2),
        ):
            started = time.monotonic()
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            assert done.returncode == expect, (name, done.stdout[-500:], done.stderr[-2000:])
            out[name].append(time.monotonic() - started)
    return out


def _check_history(env: dict, expected: int) -> dict:
    import mlflow

    from mlflow_clip.registry import history

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    events = history(NAME, ALIAS)
    moves = [e for e in events if e.event in ("promote", "rollback") and e.state == "done"]
    chain = all(later.previous == earlier.version for earlier, later in zip(moves, moves[1:]))
    tickets = [k for k in mlflow.MlflowClient().get_registered_model(NAME).tags if k.startswith("mlflow_clip.lock.")]
    result = {"events": len(events), "all_done": all(e.state == "done" for e in events), "chain": chain}
    result["lock_tickets_left"] = len(tickets)
    assert len(events) == expected and result["all_done"] and chain and not tickets, result
    return result


BREAKDOWN = {
    "gate_checksum_download_seconds": "download (in the checksum gate)",
    "gate_loads_and_predicts_startup_seconds": "probe: interpreter and imports (started ahead)",
    "gate_loads_and_predicts_load_seconds": "probe: MLflow load (verification, ONNX sessions)",
    "gate_loads_and_predicts_predict_seconds": "probe: predictions (baked and per-request)",
}


def _breakdown() -> dict:
    """The parts of the gates the promotion runs logged as metrics (the tracking URI is set)."""
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs(["0"], "params.action = 'promote'", max_results=10000)
    return {key: [r.data.metrics[key] for r in runs if key in r.data.metrics] for key in BREAKDOWN}


def _cpu() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    wanted = sorted(f for f in (flags[1].split() if flags else []) if f.startswith(("avx512", "amx")))
    return {"model": model[1] if model else "", "cores": os.cpu_count(), "flags": wanted}


def _summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s, worst {max(values):.2f} s" if values else "none"


def _print(report: dict) -> None:
    cpu = report["cpu"]
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags']) or 'none'}")
    print(f"load average before {report['load_before'][0]:.2f}, after {report['load_after'][0]:.2f}")
    for kind in ("promotions", "rollbacks"):
        runs = report[kind]
        wall = _summary([r["seconds"] for r in runs])
        cpu = _summary([r["cpu"] for r in runs])
        print(f"\n{len(runs)} {kind} ({report['model']}), wall time per process: {wall}; CPU time: {cpu}")
        for gate in sorted({g for r in runs for g in r["gates"]}):
            print(f"  gate {gate}: {_summary([r['gates'][gate] for r in runs if gate in r['gates']])}")
        for phase in ("gates", "lock", "move", "total"):
            values = [r["phases"][phase] for r in runs if phase in r["phases"]]
            if values:
                print(f"  phase {phase} (in the process): {_summary(values)}")
    print("\nwithin the gates (logged on each promotion's run):")
    for key, values in report["breakdown"].items():
        print(f"  {BREAKDOWN[key]}: {_summary(values)}")
    print("\nside by side, fresh processes, median of alternating rounds:")
    for name, values in report["baselines"].items():
        print(f"  {name}: {statistics.median(values):.2f} s")
    print(f"\nhistory: {report['checks']}")


if __name__ == "__main__":
    main()
