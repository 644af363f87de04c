"""`effnet train` under DDP with 2 CPU processes (gloo), end to end: the same stage command a multi-GPU or
multi-node run uses, with only accelerator/devices/nodes/strategy changed in params. Once through Lightning's own
launcher (devices=2), once as a cluster launches it: two nodes of one process each (torchrun --node-rank)."""
from __future__ import annotations

import subprocess
import sys

import mlflow

from effnet import models
from effnet.data.manifest import read_manifest
from effnet.stages import shard, train
from tests.conftest import free_port, result_json, stop, torchrun, train_args, write_tiny_params


def _runs(ws):
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("effnet").experiment_id])


def test_ddp_two_cpu_processes_train_one_model_logged_once(tiny_params, demo_dir, workspace):
    # Several val shards, so that each rank gets its own part of the val set.
    shard.run(tiny_params.shard.model_copy(update={"samples_per_shard": 6}), demo_dir, workspace / "shards")
    params = write_tiny_params(workspace / "params.yaml")
    sets = ["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp", "train.epochs=2"]
    result = subprocess.run([sys.executable, "-m", "effnet", *train_args("shards", params, *sets)],
                            cwd=workspace, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    model, spec = models.load_bundle(workspace / "trained")
    assert spec.classes == read_manifest(workspace / "shards")["classes"]
    client, found = _runs(workspace)
    assert len(found) == 1, "only rank 0 logs"
    run = found[0]
    assert int(run.data.params["global_batch"]) == 2 * tiny_params.train.batch_size
    total = read_manifest(workspace / "shards")["splits"]["train"]["total"]
    steps = client.get_metric_history(run.info.run_id, "train/loss")
    trained_on = round(total * (1 - tiny_params.data.holdout))  # data.holdout never reaches training
    assert max(m.step for m in steps) + 1 == 2 * (trained_on // (2 * tiny_params.train.batch_size))


def test_two_nodes_train_as_one_from_an_empty_store_and_only_node_0_writes(tiny_params, shards_dir, tmp_path,
                                                                            monkeypatch):
    """Two `torchrun --nnodes 2 --node-rank N` processes, each in its own working directory (as if on two machines
    sharing only the data), cross-replica BatchNorm on, no MLflow store yet: one MLflow run, the same weights on
    both ranks, every val image counted once, and as many optimizer steps as one process taking the same global
    batch in two accumulated halves. Node 1's directory stays empty: no store, run file, checkpoint or bundle."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    params = write_tiny_params(tmp_path / "params.yaml")
    sets = ["train.accelerator=cpu", "train.num_nodes=2", "train.strategy=ddp", "train.sync_bn=true",
            "train.lr=null", "data.num_workers=1"]  # lr null: the card's, scaled to the global batch
    port = free_port()
    procs = []
    try:
        for rank, ws in enumerate(nodes):
            ws.mkdir()
            cmd = torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                           "--master-addr", "127.0.0.1", "--master-port", str(port))
            procs.append(subprocess.Popen(cmd + train_args(shards_dir, params, *sets), cwd=ws, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            stop(p)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ranks = [result_json(out) for out, _ in outs]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert models.weights_hash(models.load_bundle(nodes[0] / "trained")[0]) == ranks[0]["weights"]
    assert "cross-replica BatchNorm" in outs[0][1]
    assert list(nodes[1].iterdir()) == [], list(nodes[1].rglob("*"))

    client, found = _runs(nodes[0])
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    val_total = read_manifest(shards_dir)["splits"]["val"]["total"]
    images = client.get_metric_history(found[0].info.run_id, "val/images")
    assert [m.value for m in images] == [val_total] * tiny_params.train.epochs

    one = tmp_path / "one"  # the same global batch on one process: two accumulated batches per step
    one.mkdir()
    monkeypatch.chdir(one)
    cfg = tiny_params.train.model_copy(update={"accumulate_grad_batches": 2, "accelerator": "cpu", "lr": None})
    single = train.fit_model(tiny_params.model_copy(update={"train": cfg}), "tiny", shards_dir)
    assert single.global_batch == ranks[0]["global_batch"] == 2 * tiny_params.train.batch_size
    assert single.steps == ranks[0]["steps"] > 0 and single.lr == ranks[0]["lr"]
