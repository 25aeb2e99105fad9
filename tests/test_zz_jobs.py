"""`ray job submit` against a real local head with token authentication.

1. start a head with ``ray start --head`` and RAY_AUTH_MODE=token;
2. submit the smoke pipeline with ``ray job submit`` (output to a ``file://`` URI, so the job also
   goes through the staging folder and its synchronisation), wait for SUCCEEDED, check its artifacts;
3. show that a client without the token is refused;
4. stop that head (only its own processes: ``ray stop`` would also kill the test session's Ray).

The job's id is chosen here (``--submission-id``) and its status read from the Jobs REST API: the
CLI prints the id wrapped in colour codes and words the status for people ("Job '...' succeeded"),
so scraping its output never saw a final state (the cause of the earlier 10-minute timeouts).
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
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

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
        yield {"address": address, "env": env, "home": home, "token": token}
    finally:
        _kill_tree_under(temp)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def _job_info(address: str, job_id: str, token: str | None) -> dict:
    """The Jobs REST API's record of one job; ``status`` is PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(f"{address}/api/jobs/{job_id}", headers=headers),
                                timeout=30) as reply:
        return json.loads(reply.read())


def test_submitted_smoke_pipeline_succeeds(token_head, tmp_path):
    target = tmp_path / "bucket" / "run1"
    runtime_env = {"working_dir": str(ROOT), "excludes": [".venv/", "runs/", ".git/", "**/__pycache__/"],
                   "env_vars": {"RAYSYNTH_STAGING": str(tmp_path / "staging")}}
    t0 = time.time()
    deadline = t0 + 120
    while True:  # the head's job agent registers a little after the jobs API answers
        job_id = f"raysynth-smoke-{secrets.token_hex(4)}"
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", token_head["address"], "--no-wait", "--submission-id", job_id,
             "--runtime-env-json", json.dumps(runtime_env), "--",
             sys.executable, "jobs/pipeline.py", "--preset", "smoke", "--out", f"file://{target}", "-q"],
            env=token_head["env"], capture_output=True, text=True, timeout=120)
        if submit.returncode == 0 or "No available agent" not in submit.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stderr
    info: dict = {}
    deadline = time.time() + 420
    while time.time() < deadline:
        try:
            info = _job_info(token_head["address"], job_id, token_head["token"])
        except urllib.error.HTTPError:  # an answer (401, 404, ...): nothing to wait for
            raise
        except (urllib.error.URLError, TimeoutError) as exc:  # no answer from a busy dashboard: ask again
            info = {"status": f"unknown ({exc})"}
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(5)
    logs = subprocess.run([RAY, "job", "logs", "--address", token_head["address"], job_id],
                          env=token_head["env"], capture_output=True, text=True, timeout=60)
    print(f"job {job_id}: {info.get('status')} {time.time() - t0:.0f}s after submission")
    assert info.get("status") == "SUCCEEDED", f"{info}\n{logs.stdout[-3000:]}\n{logs.stderr[-1000:]}"
    for rel in ["prepared/splits.json", "ddpm/fold_0/config.json", "synthetic/fold_1/manifest.json",
                "study/results.parquet", "report/report.json"]:
        assert (target / rel).is_file(), rel
    staged = [d for d in (tmp_path / "staging").glob("run1-*") if d.is_dir()]  # the job's staging folder
    assert len(staged) == 1 and (staged[0] / "report" / "report.json").is_file()
    assert "raysynth pipeline finished" in logs.stdout and f"pushed to file://{target}" in logs.stdout


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
    # The same at the HTTP level, where the CLI's wording cannot hide anything: 401 without a token,
    # 403 with a wrong one.
    for token, code in ((None, 401), (secrets.token_hex(32), 403)):
        with pytest.raises(urllib.error.HTTPError) as refused_http:
            _job_info(token_head["address"], "any", token)
        assert refused_http.value.code == code
