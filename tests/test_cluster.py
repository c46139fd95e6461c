"""The cluster path, for real on 127.0.0.1: `ray start --head`, an `mlflow server`, `ray job submit`
of `anomdiff train`, a training worker killed mid-run that the run survives, and a second node that
trains and scores beside the head."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from anomdiff.data.synthetic import synthesize

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    raise TimeoutError(f"gave up waiting for {what}")


def _healthy(url: str, token: str | None = None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def kill_session(marker: str) -> None:
    """Kill the processes whose command line names ``marker`` (our Ray head's temp dir) and their
    children: what this test started, and nothing else on the machine."""
    roots = [p for p in psutil.process_iter(["cmdline"])
             if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or [])]
    victims = {p.pid: p for root in roots for p in (root, *root.children(recursive=True))}
    for process in victims.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=20)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM a server's process group; SIGKILL it if it is still shutting down after 30 s (a loaded
    machine can take that long)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def environment():
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "PYTHONPATH": str(REPO),
           # DeepSpeed builds its CPU ops with other flags in this environment than in the in-process
           # tests; one shared build folder made each side rebuild them (minutes) after the other ran.
           "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions_anomdiff_cluster")}
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


@pytest.fixture(scope="module")
def mlflow_server(environment, tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1, stopped by its process id."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(f"{url}/health"), 180, "mlflow server /health")
        yield url
    finally:
        stop_group(server)


@pytest.fixture(scope="module")
def ray_head(environment):
    """A local Ray cluster started with `ray start --head`, stopped by its own `ray stop` address."""
    temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
    port, dashboard = free_port(), free_port()
    subprocess.run(
        [BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", "--disable-usage-stats",
         # free ports, so another Ray on the machine (a developer's, a benchmark's) cannot collide with ours
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        env=environment, check=True, capture_output=True)
    address = f"http://127.0.0.1:{dashboard}"
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    try:
        wait_for(lambda: _healthy(f"{address}/api/version", token), 90, "the Ray job server")
        # The job server answers before the head's job agent registers; a trivial job proves the path.
        trivial = [BIN / "ray", "job", "submit", "--address", address, "--", "true"]
        wait_for(lambda: subprocess.run(trivial, env=environment, capture_output=True).returncode == 0, 180,
                 "the Ray job agent")
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": address}
    finally:
        kill_session(temp_dir)  # not `ray stop`: that would stop every Ray on the machine
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster") / "data"
    synthesize(out, 2, seed=3, image_size=32, train_per_category=8, test_per_category=2, workers=1)
    return out


def train_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.path={data}", f"output_dir={out}", "model.image_size=32", "model.vae.sample_size=32",
            "model.unet.sample_size=8", "model.diffusion.ddim_steps=2", "train.batch_size=4", "train.log_every=1",
            "train.vae_steps=0",
            "train.validation_images=2", "data.validation_fraction=0.25", *extra]


def test_ray_job_submit_trains_and_logs_to_an_mlflow_server(environment, ray_head, mlflow_server, dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}}
    command = [BIN / "ray", "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(runtime_env), "--",
               sys.executable, "-m", "pipelines.train", "--config", "conf/experiment/demo.yaml",
               *train_overrides(dataset, out, "train.steps=2", "train.checkpoint_every=2",
                                "tracking.experiment=cluster-test")]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert (out / "model" / "model.safetensors").is_file()
    metadata = json.loads((out / "model" / "config.json").read_text())["metadata"]
    assert metadata["step"] == 2 and len(metadata["categories"]) == 2

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("cluster-test")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_id == (out / "mlflow_run_id").read_text().strip())
    assert parent.data.params["train.steps"] == "2" and "best/val_image_auroc" in parent.data.metrics
    assert any(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and "loss" in r.data.metrics for r in runs)


def test_a_killed_worker_resumes_from_the_last_checkpoint(environment, ray_head, dataset, tmp_path):
    out = tmp_path / "run"
    env = {**environment, "RAY_ADDRESS": ray_head["gcs"],
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    job = subprocess.Popen(
        [sys.executable, "-m", "pipelines.train", "--config", "conf/experiment/demo.yaml",
         *train_overrides(dataset, out, "train.steps=6", "train.checkpoint_every=2", "train.max_failures=2",
                          "train.keep_checkpoints=3")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: list((out / "ray").glob("checkpoint_*/train_state.json")), 600, "the first checkpoint")
        listed = subprocess.run(
            [BIN / "ray", "list", "actors", "--address", ray_head["gcs"], "--format", "json",
             "--filter", "class_name=RayTrainWorker", "--filter", "state=ALIVE"],
            env=environment, capture_output=True, text=True, check=True)
        workers = json.loads(listed.stdout)
        assert workers, "no live training worker to kill"
        os.kill(int(workers[0]["pid"]), signal.SIGKILL)
        log, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, log[-4000:]
    metadata = json.loads((out / "model" / "config.json").read_text())["metadata"]
    assert metadata["step"] in (2, 4, 6)
    steps = [json.loads(state.read_text())["step"] for state in (out / "ray").glob("checkpoint_*/train_state.json")]
    # A kill while a checkpoint is being reported can leave that checkpoint's folder written but not
    # registered; the run then resumes from the one before and writes the step again (seen: 2, 4, 4, 6).
    assert set(steps) == {2, 4, 6}, "every checkpoint survives the failure and the run reaches its last step"


def start_training(data: Path, out: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.train", "--config", "conf/experiment/demo.yaml",
         *train_overrides(data, out, "train.steps=6", "train.checkpoint_every=2",
                          "train.keep_checkpoints=3", *extra)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def checkpoint_steps(out: Path) -> list[int]:
    states = (out / "ray").glob("checkpoint_*/train_state.json")
    return sorted(json.loads(state.read_text())["step"] for state in states)


def registered_steps(out: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (a folder can be written and not yet registered)."""
    try:
        snapshot = json.loads((out / "ray" / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return sorted(result["metrics"]["step"] for result in snapshot["checkpoint_results"])


def test_a_killed_driver_is_resumed_by_the_same_command(environment, ray_head, dataset, tmp_path):
    out = tmp_path / "run"
    env = {**environment, "RAY_ADDRESS": ray_head["gcs"], "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    job = start_training(dataset, out, env)
    try:
        wait_for(lambda: registered_steps(out), 600, "the first registered checkpoint")
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert not (out / "model").exists()
    first = registered_steps(out)
    again = start_training(dataset, out, env)
    log, _ = again.communicate(timeout=900)
    assert again.returncode == 0, log[-4000:]
    assert json.loads((out / "model" / "config.json").read_text())["metadata"]["step"] in (2, 4, 6)
    assert f"resumed from the step-{max(first)} checkpoint" in log, "the rerun continues, not from step 0"
    assert registered_steps(out) == [2, 4, 6]  # no step trained twice


def test_training_goes_on_when_the_mlflow_server_goes_away(environment, ray_head, dataset, tmp_path):
    root, port = tmp_path / "mlflow", free_port()
    server = subprocess.Popen(
        [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "run"
    try:
        wait_for(lambda: _healthy(f"{url}/health"), 180, "mlflow server /health")
        job = start_training(dataset, out, {**environment, "RAY_ADDRESS": ray_head["gcs"], "MLFLOW_TRACKING_URI": url},
                             "tracking.experiment=server-goes-away")
        wait_for(lambda: checkpoint_steps(out), 600, "the first checkpoint")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    log, _ = job.communicate(timeout=900)
    assert job.returncode == 0, log[-4000:]
    assert (out / "model" / "model.safetensors").is_file() and max(checkpoint_steps(out)) == 6
    assert "stopped answering" in log
    import sqlite3  # what was logged before the server went away is kept in its store

    with sqlite3.connect(root / "mlflow.db") as db:
        logged = db.execute("select count(*) from metrics where key = 'loss'").fetchone()[0]
    assert logged >= 1


WHICH_RAY = ("import sys, ray\nsys.path.insert(0, {repo!r})\nfrom pipelines import runtime\n"
             "{start}\nprint('GCS', ray.get_runtime_context().gcs_address)\nray.shutdown()\n")


def test_a_job_without_an_address_starts_its_own_ray_beside_a_foreign_head(tmp_path):
    """Another program's `ray start --head` on this machine (another virtualenv, say): plain `ray.init()`
    joins it, the jobs' `runtime.start_ray()` does not."""
    ray_tmp = tempfile.mkdtemp(prefix="rayf", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ['PATH']}")
    port = free_port()
    subprocess.run(
        [BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
         f"--temp-dir={ray_tmp}/ray", "--include-dashboard=false", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        env=env, check=True, capture_output=True)
    foreign = str(port)

    def gcs_port(start: str) -> str:
        done = subprocess.run([sys.executable, "-c", WHICH_RAY.format(repo=str(REPO), start=start)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        address = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("GCS "))
        return address.rsplit(":", 1)[1]  # the host may be the machine's address rather than 127.0.0.1

    try:
        assert gcs_port("ray.init()") == foreign  # the trap is there
        assert gcs_port("runtime.start_ray(num_cpus=1, include_dashboard=False)") != foreign
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"  # asked for: joined
        assert gcs_port("runtime.start_ray()") == foreign
    finally:
        kill_session(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


EVALUATE_KILLED = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import anomdiff.metrics
merge = anomdiff.metrics.StreamingMetrics.merge
def merge_then_die(self, other):
    merge(self, other)
    os.kill(os.getpid(), signal.SIGKILL)  # one scoring actor's batch folded in, the rest still to come
anomdiff.metrics.StreamingMetrics.merge = merge_then_die
from pipelines.evaluate import evaluate
evaluate({model!r}, {data!r}, {out!r}, ["evaluate.batch_size=2"])
"""


def test_an_evaluation_killed_mid_way_leaves_no_metrics_and_the_rerun_completes(environment, ray_head, dataset,
                                                                                tmp_path):
    from samples import noise_bank_knn

    model, out = tmp_path / "model", tmp_path / "evaluation"
    knn = noise_bank_knn(image_size=32, num_categories=2)
    knn.save(model, metadata={"categories": ["noise-000", "stripes-001"], "score_range": [0.0, 10.0]})
    env = {**environment, "RAY_ADDRESS": ray_head["gcs"], "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    victim = subprocess.run(
        [sys.executable, "-c", EVALUATE_KILLED.format(repo=str(REPO), model=str(model), data=str(dataset),
                                                      out=str(out))],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert victim.returncode == -signal.SIGKILL, victim.stdout[-2000:] + victim.stderr[-2000:]
    assert "[evaluate] scored" not in victim.stdout  # killed with the first batch folded in, before any report
    assert not (out / "metrics.json").exists()

    done = subprocess.run([sys.executable, "-m", "pipelines.evaluate", str(model), str(dataset), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["num_images"] == 4 and sorted(doc["per_category"]) == ["noise-000", "stripes-001"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def ray_state(kind: str, gcs: str, env: dict, *filters: str) -> list[dict]:
    """`ray list KIND` as JSON, dead entries included (what ran and has finished is listed too)."""
    args = [arg for f in filters for arg in ("--filter", f)]
    listed = subprocess.run([BIN / "ray", "list", kind, "--address", gcs, "--format", "json", "--detail",
                             "--limit", "10000", *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(listed.stdout)


@pytest.fixture
def second_node(environment, ray_head):
    """A second Ray node joined to the head on 127.0.0.1, with a resource only it has; stopped after
    the test (its raylet, found by its own node-manager port, and everything that raylet started)."""
    manager_port = free_port()
    subprocess.run(
        [BIN / "ray", "start", f"--address={ray_head['gcs']}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         '--resources={"second_node": 1}', f"--node-manager-port={manager_port}",
         f"--object-manager-port={free_port()}", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        env=environment, check=True, capture_output=True)
    try:
        nodes = wait_for(lambda: [n for n in ray_state("nodes", ray_head["gcs"], environment, "state=ALIVE")
                                  if "second_node" in n["resources_total"]], 120, "the second Ray node")
        yield nodes[0]["node_id"]
    finally:
        kill_session(f"--node_manager_port={manager_port}")


def test_two_nodes_train_one_worker_each_and_score_one_actor_each(environment, ray_head, second_node, dataset,
                                                                   tmp_path):
    out = tmp_path / "run"
    gcs = ray_head["gcs"]
    env = {**environment, "RAY_ADDRESS": gcs, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    before = {a["actor_id"] for a in ray_state("actors", gcs, environment)}
    train = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--config", "conf/experiment/demo.yaml",
         *train_overrides(dataset, out, "train.steps=2", "train.checkpoint_every=2", "train.num_workers=2",
                          "train.placement_strategy=STRICT_SPREAD")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    evaluation = subprocess.run(
        [sys.executable, "-m", "pipelines.evaluate", "--out", str(out / "evaluation"), str(out / "model"), str(dataset),
         "scorers=2", "evaluate.batch_size=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert evaluation.returncode == 0, evaluation.stdout[-3000:] + evaluation.stderr[-3000:]
    assert json.loads((out / "evaluation" / "metrics.json").read_text())["num_images"] == 4

    ran = [a for a in ray_state("actors", gcs, environment) if a["actor_id"] not in before]
    workers = [a["node_id"] for a in ran if a["class_name"] == "RayTrainWorker"]
    scorers = [a["node_id"] for a in ran if "Scorer" in a["class_name"]]
    assert len(workers) == 2 and len(set(workers)) == 2 and second_node in workers, f"training workers' nodes {workers}"
    assert len(scorers) == 2 and len(set(scorers)) == 2 and second_node in scorers, f"scoring actors' nodes {scorers}"
