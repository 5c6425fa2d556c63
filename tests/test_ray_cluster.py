"""`compare --launcher ray` on a two-node Ray cluster simulated on this machine (1 CPU per node), kept on
the loopback address: the sweep spreads over both nodes, and a run whose node worker is killed mid-run
is retried by Ray from its last checkpoint and finishes with the metrics of an uninterrupted run."""
import json
import subprocess
import sys

import pytest

from tests.test_compare import ENV, ROOT, SWEEP, TINY, val_metrics

ray = pytest.importorskip("ray")


@pytest.fixture
def cluster(monkeypatch, one_ray_at_a_time):
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Ray turns 127.0.0.1 in a cluster address into this machine's outward address unless it is told
    # the cluster is this machine's only (the switch's name is about Windows/macOS, where that is the
    # default); children (raylets, workers, the compare process) read the environment.
    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=node)
    c.add_node(**node)
    try:
        yield c
    finally:
        c.shutdown()


@pytest.mark.slow
def test_a_sweep_spreads_over_two_nodes_and_a_killed_worker_is_retried(cluster, tmp_path, sweep_reference):
    assert cluster.address.startswith("127.0.0.1:")
    # the first run to reach step 2 SIGKILLs the Ray worker running it (and so its training process)
    kill = json.dumps({"class_path": "tests.conftest.KillAt",
                       "init_args": {"step": 2, "fresh_only": True, "parent": True, "once": str(tmp_path / "killed")}})
    out = tmp_path / "ray"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "compare", *TINY, *SWEEP, "--out", str(out),
                           "--launcher", "ray", "--ray-address", cluster.address, "--cpus-per-run", "1",
                           "--max-retries", "1", f"--trainer.callbacks+={kill}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "killed").exists()
    nodes = {n.node_id: n.node_ip_address for n in cluster.list_all_nodes()}
    assert len(nodes) == 2 and set(nodes.values()) == {"127.0.0.1"}  # both nodes on loopback only

    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs.values())
    assert {r["node"] for r in runs.values()} == {f"127.0.0.1/{n}" for n in nodes}  # spread over both nodes
    assert sorted(r["retries"] for r in runs.values()) == [0, 0, 0, 1]  # the killed one, retried by Ray
    killed = next(name for name, r in runs.items() if r["retries"])
    log = (out / "runs" / killed / "run.log").read_text()
    assert "--ckpt_path=last" in log.split("=== attempt")[-1]  # the retry resumed from the checkpoint
    assert val_metrics(out) == val_metrics(sweep_reference()), f"the retried run {killed}'s log:\n{log[-4000:]}"
