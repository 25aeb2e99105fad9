"""`ray job submit` against a real local head with token authentication.

1. start a head with ``ray start --head`` and RAY_AUTH_MODE=token;
2. submit the smoke pipeline with ``ray job submit``, wait for SUCCEEDED, check its artifacts;
3. show that a client without the token is refused;
4. stop that head (only its own processes: ``ray stop`` would also kill the test session's Ray).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    # Opt-in until it is reliable: on the shared 2-core CI machine the submitted smoke job did not
    # reach SUCCEEDED within 10 minutes beside the session's own Ray (see the issue-7 note).
    pytest.mark.skipif(os.environ.get("RAYSYNTH_JOB_TESTS") != "1",
                       reason="ray job submit end-to-end test is opt-in: set RAYSYNTH_JOB_TESTS=1"),
]

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree_under(marker: str) -> None:
    """SIGKILL every process whose command line mentions ``marker`` (this head's temp dir)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if marker in cmdline:
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def token_head():
    temp = tempfile.mkdtemp(prefix="rsj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    home = tempfile.mkdtemp(prefix="rsj-home-", dir="/tmp")
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=home, RAY_USAGE_STATS_ENABLED="0")
    port, dash = _free_port(), _free_port()
    # Every port explicit: the test session's own Ray already holds the defaults (the job agent's
    # 52365 among them), and a head whose agent cannot bind never accepts a job.
    agent, grpc, metrics, client, runtime = (_free_port() for _ in range(5))
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                    f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
                    f"--runtime-env-agent-port={runtime}",
                    "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=true"],
                   env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # the jobs API comes up a little after `ray start` returns
            if subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(2)
        yield {"address": address, "env": env, "home": home}
    finally:
        _kill_tree_under(temp)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def test_submitted_smoke_pipeline_succeeds(token_head, tmp_path):
    out = tmp_path / "job-out"
    runtime_env = {"working_dir": str(ROOT), "excludes": [".venv/", "runs/", ".git/", "**/__pycache__/"]}
    deadline = time.time() + 120
    while True:  # the head's job agent registers a little after the jobs API answers
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", token_head["address"], "--no-wait",
             "--runtime-env-json", json.dumps(runtime_env), "--",
             sys.executable, "jobs/pipeline.py", "--preset", "smoke", "--out", str(out), "-q"],
            env=token_head["env"], capture_output=True, text=True, timeout=120)
        if submit.returncode == 0 or "No available agent" not in submit.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stderr
    job_id = next(w for w in submit.stdout.split() if w.startswith("raysubmit_")).strip("'.")
    status = ""
    deadline = time.time() + 600
    while time.time() < deadline:
        status = subprocess.run([RAY, "job", "status", "--address", token_head["address"], job_id],
                                env=token_head["env"], capture_output=True, text=True).stdout
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(5)
    logs = subprocess.run([RAY, "job", "logs", "--address", token_head["address"], job_id],
                          env=token_head["env"], capture_output=True, text=True).stdout
    assert "SUCCEEDED" in status, f"{status}\n{logs[-3000:]}"
    for rel in ["prepared/splits.json", "ddpm/fold_0/config.json", "synthetic/fold_1/manifest.json",
                "study/results.parquet", "report/report.json"]:
        assert (out / rel).is_file(), rel
    assert "raysynth pipeline finished" in logs


def test_client_without_token_is_refused(token_head):
    env = {k: v for k, v in token_head["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    refused = subprocess.run([RAY, "job", "list", "--address", token_head["address"]], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()
    wrong = dict(env, RAY_AUTH_TOKEN=secrets.token_hex(32))
    refused = subprocess.run([RAY, "job", "list", "--address", token_head["address"]], env=wrong,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    allowed = subprocess.run([RAY, "job", "list", "--address", token_head["address"]], env=token_head["env"],
                             capture_output=True, text=True, timeout=60)
    assert allowed.returncode == 0, allowed.stderr
