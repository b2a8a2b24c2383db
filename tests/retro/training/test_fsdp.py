"""`retro train --fsdp`: 2 CPU processes (gloo) train the loss curve of 1 process, sharded
checkpoints resume on another number of processes (2 -> 1, 1 -> 2), and convert to the single-file
checkpoint that generate/evaluate load.

Tolerance. Sharded and single-process training do the same float32 arithmetic except for the order
of a few sums: each rank back-propagates half the batch and the halves' gradients are added by the
reduce-scatter, and the summed NLL is all-reduced. Each such sum differs by a few float32 ulps
(relative 1e-7); AdamW's update m / sqrt(v) passes a relative gradient change through at about
the same size, so after 4 steps the losses differ by ~1e-7 relative (measured: at most 1.3e-7).
rtol 1e-5 leaves two orders of magnitude for that, and stays far below what a real error changes:
the loss moves by ~2e-2 per step here, so a wrong data split (other sequences), a missing or
doubled gradient reduction, or unclipped gradients (the norms are 1.8-2.3 > --grad-clip 1 in the
first steps) change the loss of step 2 on by far more than 1e-5.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers.retrieval_helpers import ROOT, free_port, quick_database
from tests.helpers.train_helpers import Stop, stop_at
from retro.training import fsdp
from retro.base.errors import RetroError
from retro.training.train import TrainOptions, load_model, train

SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1]}
STEPS, SAVE_EVERY, RTOL = 4, 2, 1e-5
TORCHRUN_TIMEOUT = 150  # seconds; a hung rendezvous or collective fails the test instead of hanging it


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return quick_database(tmp_path_factory.mktemp("fsdp"), mp)


def opts(db, out, **kw):
    base = dict(db=str(db), out=str(out), steps=STEPS, batch_size=4, seq_chunks=4, lr=3e-3, warmup=2,
                save_every=SAVE_EVERY, overrides=dict(SMALL), progress=False, device="cpu")
    return TrainOptions(**{**base, **kw})


def cli_args(db, out, *extra):
    return ["train", "--db", str(db), "--out", str(out), "--steps", str(STEPS), "--batch-size", "4",
            "--seq-chunks", "4", "--lr", "3e-3", "--warmup", "2", "--save-every", str(SAVE_EVERY), "--device", "cpu",
            "--no-progress", *extra] + [x for k, v in SMALL.items() for x in ("--set", f"{k}={json.dumps(v)}")]


def torchrun(*args) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m retro ARGS`, started (not waited for)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), "-m", "retro", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def finished(proc: subprocess.Popen) -> None:
    """Waits for a torchrun (killed after TORCHRUN_TIMEOUT) and checks that both ranks ended cleanly."""
    try:
        _, err = proc.communicate(timeout=TORCHRUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-4000:]
    for bad in ("Traceback", "abort", "destroy_process_group() was not called"):  # a clean shutdown on every rank
        assert bad not in err, err[-4000:]


def retro_cli(capsys, *args) -> tuple[int, str, str]:
    """`retro ARGS` in this process -> (exit status, stdout, stderr)."""
    from retro.app.cli import main

    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def log(run, key="loss"):
    return [json.loads(line)[key] for line in (run / "log.jsonl").read_text().splitlines()]


def until(run, dst, step):
    """A copy of RUN as a kill right after `step`'s checkpoint leaves it."""
    shutil.copytree(run, dst)
    for d in fsdp.complete_steps(dst):
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)
    return dst


@pytest.fixture(scope="module")
def runs(db, tmp_path_factory):
    """The two 2-process runs, started together (each is mostly start-up): "two", a whole --fsdp
    run with --checkpointing; "one_to_two", a 1-process --fsdp run killed after step 2's checkpoint
    (at step 3), resumed by 2 processes. While they run, this process trains "one", the reference:
    1 process without --fsdp (single-file checkpoints)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.raises(Stop, match="stopped before step 3"), stop_at(3):
        train(opts(db, root / "one_to_two", fsdp=True), log=lambda *_: None)
    killed = [d.name for d in fsdp.complete_steps(root / "one_to_two")]
    with pytest.raises(RetroError, match="pass --resume"):
        train(opts(db, root / "one_to_two", fsdp=True), log=lambda *_: None)
    procs = [torchrun(*cli_args(db, root / "two", "--fsdp", "--checkpointing")),
             torchrun(*cli_args(db, root / "one_to_two", "--fsdp", "--resume"))]
    try:
        train(opts(db, root / "one"), log=lambda *_: None)
    finally:
        for proc in procs:
            finished(proc)
    return {"two": root / "two", "one_to_two": root / "one_to_two", "killed": killed, "one": root / "one"}


@pytest.fixture(scope="module")
def one(runs):
    return runs["one"]


def test_two_processes_match_one_and_resume_on_one(db, one, runs, tmp_path, capsys):
    two = runs["two"]  # --checkpointing composed with the sharding
    ref = log(one)
    assert max(log(one, "grad_norm")[:2]) > 1.0  # --grad-clip 1 clips: the sharded clipping is exercised
    np.testing.assert_allclose(log(two), ref, rtol=RTOL)
    np.testing.assert_allclose(log(two, "grad_norm"), log(one, "grad_norm"), rtol=RTOL)
    steps = fsdp.complete_steps(two)
    assert [d.name for d in steps] == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [d.name for d in steps]  # no temporary left
    assert len(list(steps[-1].glob("*.distcp"))) == 2  # one file of shards per rank

    # 2 -> 1: killed after step 2's checkpoint, resumed by one process
    resumed = until(two, tmp_path / "resumed", 2)
    (resumed / "checkpoints" / ".step-00000004.tmp").mkdir()  # a save the kill cut short: ignored
    assert fsdp.latest_step_dir(resumed).name == "step-00000002"
    train(opts(db, resumed, fsdp=True, resume=True), log=lambda *_: None)
    np.testing.assert_allclose(log(resumed), ref, rtol=RTOL)

    # the converted checkpoint holds the 1-process run's weights; generate loads it
    with pytest.raises(RetroError, match="sharded checkpoints only .* `retro convert-checkpoint "):
        load_model(two)
    status, _, _ = retro_cli(capsys, "convert-checkpoint", two, "--out", tmp_path / "converted")
    assert status == 0 and (tmp_path / "converted" / "checkpoint" / "model.safetensors").exists()
    a, _ = load_model(one, device="cpu")
    b, state = load_model(tmp_path / "converted", device="cpu")
    assert state["step"] == STEPS and a.state_dict().keys() == b.state_dict().keys()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        # atol as in test_training's DDP test: Adam turns rounding in near-zero gradients into ~1e-3 x lr
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    status, out, _ = retro_cli(capsys, "generate", tmp_path / "converted", "alpha beta", "--db", db,
                               "--max-new-tokens", "4", "--no-retrieval", "--temperature", "0", "--device", "cpu")
    assert status == 0 and out.startswith("alpha beta")


def test_one_process_checkpoint_resumes_on_two(one, runs):
    assert runs["killed"] == ["step-00000002"]
    np.testing.assert_allclose(log(runs["one_to_two"]), log(one), rtol=RTOL)


def test_convert_checkpoint_errors(one, tmp_path, capsys):
    with pytest.raises(RetroError, match="holds no sharded checkpoint"):
        fsdp.convert_checkpoint(one)
    status, _, err = retro_cli(capsys, "convert-checkpoint", tmp_path / "nothing")
    assert status == 2 and "retro convert-checkpoint: error:" in err and "holds no sharded checkpoint" in err
    with pytest.raises(RetroError, match="--step must be an integer >= 1, got 0"):
        fsdp.convert_checkpoint(one, step=0)
    with pytest.raises(RetroError, match=r"--step 3: .* \(complete steps: none\)"):
        fsdp.convert_checkpoint(one, step=3)


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process (fully_shard needs a group)."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_layers_run_through_fsdp_with_checkpointing(one_rank_group, monkeypatch):
    """fully_shard on one rank: every decoder block and encoder layer is its own FSDP unit and is
    called through its hooks, checkpointing re-runs each block in the backward pass, bf16 on the
    CPU stays float32, and the loss and gradients are those of the unsharded model."""
    import copy

    import retro.model.model
    from torch.distributed.fsdp import FSDPModule
    from retro.model.model import RetroModel, preset

    calls = []
    layer_fn = retro.model.model.DecoderLayer.forward
    monkeypatch.setattr(retro.model.model.DecoderLayer, "forward",
                        lambda self, *a: calls.append(1) or layer_fn(self, *a))
    cfg = preset("tiny", **{**SMALL, "vocab_size": 50, "chunk_size": 4, "max_seq_len": 16})
    plain = RetroModel(cfg)
    sharded = copy.deepcopy(plain)
    plain.checkpointing = sharded.checkpointing = True
    fsdp.shard_model(sharded, torch.device("cpu"), bf16=True)
    units = fsdp.shard_units(sharded)
    assert len(units) == cfg.depth + cfg.enc_depth and all(isinstance(u, FSDPModule) for u in units + [sharded])
    entered = []
    for u in units:
        u.register_forward_pre_hook(lambda *_: entered.append(1))
    tokens = torch.randint(0, 50, (2, 16))
    neighbours, mask = torch.randint(0, 50, (2, 4, 2, 8)), torch.rand(2, 4, 2, 8) > 0.2
    losses = []
    for model in (plain, sharded):
        model.train()
        calls.clear()
        out = model(tokens, neighbours, mask)
        assert out.dtype == torch.float32
        loss = out.square().mean()
        loss.backward()
        # each block ran again in the backward pass; the first CCA block runs as two calls (its
        # self-attention, then CCA and feed-forward, with the model's encoder call between)
        assert len(calls) == 2 * (cfg.depth + 1)
        losses.append(loss.item())
    # every unit's hooks fired, in the forward pass and again in the recomputation (the model
    # checkpoints the encoder's call too, so it is recomputed)
    assert len(entered) == 2 * (cfg.depth + 1 + cfg.enc_depth)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    grads = dict(sharded.named_parameters())
    for name, p in plain.named_parameters():
        g = grads[name].grad
        torch.testing.assert_close(g.full_tensor() if hasattr(g, "full_tensor") else g, p.grad, rtol=1e-5, atol=1e-7,
                                   msg=name)


def test_the_loss_in_checkpointed_slices_runs_through_fsdp(one_rank_group, monkeypatch):
    """forward(..., targets=...) of a sharded model in 4 slices, each recomputed in the backward
    pass (sliced_loss.py) with the root unit's tied embedding: the NLL and every gradient are the
    unsharded model's."""
    import copy

    from retro.model import sliced_loss
    from retro.base.defaults import IGNORE
    from retro.model.model import RetroModel, preset

    monkeypatch.setattr(sliced_loss, "LOGITS_BUDGET", 2 * 50 * 4)  # 4 positions per slice: 16 = 4 + 4 + 4 + 4
    cfg = preset("tiny", **{**SMALL, "vocab_size": 50, "chunk_size": 4, "max_seq_len": 16})
    plain = RetroModel(cfg)
    sharded = copy.deepcopy(plain)
    fsdp.shard_model(sharded, torch.device("cpu"), bf16=False)
    tokens, targets = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    targets[0, :3] = IGNORE
    neighbours, mask = torch.randint(0, 50, (2, 4, 2, 8)), torch.rand(2, 4, 2, 8) > 0.2
    nlls = []
    for model in (plain, sharded):
        model.train()
        nll = model(tokens, neighbours, mask, targets=targets)
        (nll * torch.linspace(0.5, 1.5, 16)).sum().backward()
        nlls.append(nll.detach())
    torch.testing.assert_close(nlls[1], nlls[0], rtol=1e-6, atol=1e-7)
    grads = dict(sharded.named_parameters())
    for name, p in plain.named_parameters():
        g = grads[name].grad
        torch.testing.assert_close(g.full_tensor() if hasattr(g, "full_tensor") else g, p.grad, rtol=1e-5, atol=1e-7,
                                   msg=name)
