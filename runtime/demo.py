"""`weightsync demo`: a coordinator, a trainer and real vLLM engines on CPU, several verified rounds.

Each engine is a `weightsync serve` process (vLLM's OpenAI server with a daemon attached);
this process is the trainer. Per round it prints time, bytes, GiB/s, each daemon's verdict
and a greedy sample from every engine with the version that served it. The last round
pushes the original weights back with `weightsync push` and checks that the original
tokens return. Exit 0 only if every round committed and the restore matched.

It prints every command it runs, ready to copy (coordinator, serve, push), and the torch
and vLLM versions. Its temp dir is removed on exit unless `--keep` (or a failure: then
the logs stay, and the path is printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

__all__ = ["run_demo"]

PROMPT = "The new weights say"
SAMPLE_TOKENS = 10
ENGINE_START_TIMEOUT_S = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _http_json(url: str, body: dict | None = None, timeout_s: float = 60.0) -> tuple[dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read()), dict(r.headers)


def sample(port: int, model: str) -> tuple[str, str]:
    """A greedy completion and the weight version that served it."""
    out, headers = _http_json(
        f"http://127.0.0.1:{port}/v1/completions",
        {"model": model, "prompt": PROMPT, "max_tokens": SAMPLE_TOKENS, "temperature": 0.0},
    )
    return out["choices"][0]["text"], headers.get("x-weightsync-version", "?")


def _command(env_names: list[str], env: dict[str, str], argv: list[str]) -> str:
    """The command as a shell line, with the environment variables the demo sets for it."""
    prefix = " ".join(f"{k}={shlex.quote(env[k])}" for k in env_names)
    return (prefix + " " if prefix else "") + shlex.join(argv)


def _versions() -> str:
    import torch

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = "not installed"
    return f"python {sys.version.split()[0]}, torch {torch.__version__}, vLLM {vllm_version}"


def _wait(what: str, ready, procs: list[subprocess.Popen], logs: Path, timeout_s: float) -> None:
    t0 = time.monotonic()
    last = 0.0
    while not ready():
        waited = time.monotonic() - t0
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"demo: a process exited with {p.returncode} while waiting for {what}; logs in {logs}")
        if waited > timeout_s:
            raise SystemExit(f"demo: {what} not ready after {timeout_s:.0f} s; logs in {logs}")
        if waited - last >= 5:
            _say(f"  ... waiting for {what} ({waited:.0f} s)")
            last = waited
        time.sleep(0.5)


def run_demo(args: argparse.Namespace) -> int:
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="weightsync-demo-"))
    ok = False
    try:
        ok = _run(args, work)
        return 0 if ok else 1
    finally:
        if args.workdir or args.keep or not ok:
            _say(f"demo: models and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> bool:
    from weightsync.control.trainer_client import SyncTrainerClient
    from weightsync.engine import inventory_from_model_dir, make_tiny_model, random_weights
    from weightsync.runtime.trainer import WeightSync

    # The demo prints its own per-round lines; library INFO lines would bury them.
    logging.getLogger("weightsync").setLevel(logging.WARNING)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # vLLM's caches and sockets inside the demo's dir, removed with it. (VLLM_ENABLE_V1_MULTIPROCESSING
    # is not set: serve's engine core runs in its own process whatever it says.)
    demo_env = {
        "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(work / "vllm-cache")),
        "VLLM_RPC_BASE_PATH": os.environ.get("VLLM_RPC_BASE_PATH", str(work / "rpc")),
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **demo_env}
    (work / "rpc").mkdir(exist_ok=True)
    script = Path(sys.executable).parent / "weightsync"
    weightsync = [str(script)] if script.exists() else [sys.executable, "-m", "weightsync.runtime.cli"]

    _say(f"[0/4] {_versions()}")
    _say(f"[1/4] generating a tiny random {args.arch} model in {work / 'model'}")
    model_dir = str(make_tiny_model(work / "model", args.arch, seed=0, dtype="float32"))
    specs = inventory_from_model_dir(model_dir)

    port = _free_port()
    coordinator = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    http_ports = [_free_port() for _ in range(args.engines)]
    try:
        _say(f"[2/4] starting the coordinator on {coordinator} and {args.engines} vLLM engines (logs: {logs}):")
        cmd = [*weightsync, "coordinator", "--listen", coordinator]
        _say(f"  $ {_command([], env, cmd)}")
        procs.append(subprocess.Popen(cmd, env=env, stdout=open(logs / "coordinator.log", "w"), stderr=subprocess.STDOUT))
        for i, hp in enumerate(http_ports):
            cmd = [*weightsync, "serve", model_dir, "--coordinator", coordinator, "--daemon-id", f"engine-{i}",
                   "--host", "127.0.0.1", "--port", str(hp), "--dtype", "float32", "--max-model-len", "256",
                   "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20), "--served-version", "0"]
            _say(f"  $ {_command(list(demo_env), env, cmd)}")
            procs.append(subprocess.Popen(cmd, env=env, stdout=open(logs / f"engine-{i}.log", "w"), stderr=subprocess.STDOUT))
        client = SyncTrainerClient(coordinator, rpc_timeout_s=10)

        def engines_ready() -> bool:
            try:
                daemons = client.list_daemons().daemons
            except Exception:  # coordinator still starting: poll again
                return False
            return sum(1 for d in daemons if d.state == 1) == args.engines

        _wait("the engines to start and register", engines_ready, procs, logs, ENGINE_START_TIMEOUT_S)
        before = [sample(hp, model_dir) for hp in http_ports]
        for i, (text, version) in enumerate(before):
            _say(f"  engine-{i} (version {version}): {text!r}")

        _say(f"[3/4] pushing {args.rounds} rounds of new weights from this process (WeightSync.push), "
             "then the original weights back with `weightsync push`")
        ok = True
        rounds = [(v, random_weights(specs, seed=v)) for v in range(1, args.rounds + 1)]
        restore_version = args.rounds + 1
        _say(f"  {'ver':>3}  {'state':<9} {'seconds':>7} {'MiB':>7} {'GiB/s':>7}  verdicts / samples")
        previous = [b[0] for b in before]

        def show(version: int, state: str, seconds: float, mib: float, verdicts: str, committed: bool) -> bool:
            _say(f"  {version:>3}  {state:<9} {seconds:7.3f} {mib:7.2f} {mib / 1024 / max(seconds, 1e-9):7.3f}  {verdicts}")
            good = committed
            for i, hp in enumerate(http_ports):
                text, served = sample(hp, model_dir)
                changed = text != previous[i]
                _say(f"         engine-{i} (version {served}): {text!r}" + ("" if changed else "  <- UNCHANGED"))
                good &= served == str(version) and changed
                previous[i] = text
            return good

        with WeightSync(coordinator, rendezvous_host="127.0.0.1", deadline_s=120, collective_timeout_s=60) as sync:
            for version, weights in rounds:
                t0 = time.monotonic()
                report = sync.push(weights, version=version, raise_on_failure=False)
                verdicts = ", ".join(f"{v.daemon_id}={v.status}" for v in report.results)
                ok &= show(version, report.state, time.monotonic() - t0, report.total_bytes / 2**20, verdicts, report.committed)
        cmd = [*weightsync, "push", "--coordinator", coordinator, "--weights", model_dir, "--version", str(restore_version), "--json"]
        _say(f"  $ {_command([], env, cmd)}")
        t0 = time.monotonic()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        (logs / "push.log").write_text(out.stdout + out.stderr)
        try:
            summary = json.loads(out.stdout)
        except json.JSONDecodeError:
            _say(f"  `weightsync push` exited {out.returncode}: {out.stderr.strip()[-500:]}")
            return False
        verdicts = ", ".join(f"{d}={s}" for d, s in summary["daemons"].items())
        ok &= show(restore_version, summary["state"], time.monotonic() - t0, summary["bytes"] / 2**20, verdicts,
                   out.returncode == 0 and summary["state"] == "COMMITTED")
        restored = previous == [b[0] for b in before]
        _say("[4/4] " + ("original weights restored: the original tokens are back" if restored else "RESTORE MISMATCH: tokens differ"))
        client.close()
        ok &= restored
        _say("demo: " + ("every round committed with matching checksums" if ok else "FAILED (see above)"))
        return ok
    finally:
        for p in procs[::-1]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs[::-1]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
