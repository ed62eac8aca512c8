"""Two CPU processes over gloo make the update one process makes on the same batch (flowdppo.training.distributed).

The launched script is tests/dist_worker.py; the one-process reference runs in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowdppo.config import ConfigError, load_config
from flowdppo.core import advantages as adv_lib
from flowdppo.training.distributed import Dist
from flowdppo.training.trainer import Trainer, resume

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from dist_worker import TINY_SHAPES, capture_advantages, tiny_shapes  # noqa: E402
from toy import PROMPTS, ToyModel, brightness_reward  # noqa: E402

WORKER = str(HERE / "dist_worker.py")
# 3 prompts x 4 samples = 12: process 0 rolls out samples 0-5, process 1 samples 6-11, so prompt 1's
# group (samples 4-7) spans both. Mini-batches of 4 (2 per process), 2 epochs, rollout chunks of 4
# that straddle the split, KL to the reference in the loss.
STEP = [
    "train.iterations=1",
    "train.prompts_per_iter=3",
    "train.group_size=4",
    "train.minibatch_size=4",
    "train.micro_batch_size=2",
    "train.rollout_batch_size=4",
    "train.inner_epochs=2",
    "train.lr=0.05",
    "algorithm.beta=0.01",
    "sampling.num_steps=6",
    "reward.weights={bright: 1.0}",
    "log.tensorboard=false",
    "eval.ratio_noise_every=1",
    "eval.ratio_noise_samples=8",
]
RUN = [
    "train.prompts_per_iter=3",
    "train.group_size=4",
    "train.minibatch_size=4",
    "train.micro_batch_size=2",
    "train.rollout_batch_size=4",
    "reward.weights={bright: 1.0}",
    "log.tensorboard=false",
    "eval.every=1",
    "eval.num_prompts=3",
    "eval.grid_prompts=2",
    "eval.ratio_noise_every=1",
    "eval.ratio_noise_samples=4",
    "log.checkpoint_every=1",
]
FSDP2 = RUN + [
    "train.iterations=2",
    "sampling.num_steps=4",
    "steps.num_sde_steps=2",
    "train.lr=0.01",
    "model.lora=false",
    "train.sharding=fsdp2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, out: Path, overrides: list[str], launcher: str = "torchrun", timeout: int = 240) -> list[dict]:
    """Run the worker on 2 processes; returns what each process dumped."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # `--cpu --num_processes 2` would start one process: --multi_gpu is what starts 2 over gloo here
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(
        cmd + [WORKER, mode, str(out), *overrides], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2)]


@contextlib.contextmanager
def one_thread():
    """The one-process reference on one thread, like each launched process (much faster on a busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_two_processes_match_one_process(tmp_path):
    r0, r1 = launch("step", tmp_path / "two", STEP)
    assert (r0["world"], r1["world"]) == (2, 2) and (r0["rank"], r1["rank"]) == (0, 1)
    # advantages: identical on both processes, from the whole batch's rewards
    assert torch.equal(r0["adv"], r1["adv"])
    rewards = r0["rewards"]["bright"]
    group_ids = torch.arange(3).repeat_interleave(4)
    torch.testing.assert_close(r0["adv"], adv_lib.group_advantages(rewards, group_ids), rtol=0, atol=1e-6)
    # prompt 1's group (samples 4-7) spans the processes and is normalised as one group: its advantages sum
    # to zero over the group, not over each process's half
    split = r0["adv"][4:8]
    assert abs(float(split.sum())) < 1e-5
    assert abs(float(split[:2].sum())) > 1e-3 and abs(float(split[2:].sum())) > 1e-3
    # one process, same total batch, same seeds
    with one_thread():
        tr = Trainer(
            load_config(overrides=STEP),
            model=ToyModel(0),
            reward_fn=brightness_reward,
            prompts=PROMPTS,
            eval_sets={},
            run_dir=tmp_path / "one",
        )
        box: list = []
        capture_advantages(tr, box)
        m1 = tr.iteration_step(0)
    torch.testing.assert_close(r0["adv"], box[0]["adv"], rtol=0, atol=1e-6)
    one = tr.model.adapter_state_dict()
    start = ToyModel(0).adapter_state_dict()
    assert max(float((one[k] - start[k]).abs().max()) for k in one) > 0.1  # the step did move the weights
    for r in (r0, r1):
        for k in one:
            torch.testing.assert_close(r["params"][k], one[k], rtol=1e-4, atol=2e-5, msg=k)
    # whole-batch metrics: gradient norm (the loss normalisation), ratios, KL, rewards
    assert m1["num_optimizer_steps"] == r0["metrics"]["num_optimizer_steps"] == 6
    for k in (
        "grad_norm",
        "policy_loss",
        "ratio_mean",
        "ratio_min",
        "ratio_max",
        "kl_mean",
        "kl_max",
        "kl_ref",
        "reward/bright",
        "adv/std",
        "first_mb/ratio_max",
        "replay/logp_abs_diff_max",
    ):
        assert r0["metrics"][k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
        assert r1["metrics"][k] == r0["metrics"][k], k
    assert r0["metrics"]["first_mb/ratio_max"] == pytest.approx(1.0, abs=1e-6)


def test_resume_on_two_processes(tmp_path):
    """Only rank 0 writes; a run stopped and resumed on 2 processes equals the uninterrupted one."""
    r0, r1 = launch("resume", tmp_path, RUN + ["train.iterations=3", "sampling.num_steps=6", "train.lr=0.02"])
    assert r0["resumed_at"] == 1
    for k, v in r0["full_params"].items():
        torch.testing.assert_close(r0["params"][k], v, rtol=0, atol=1e-6)
        assert torch.equal(r1["params"][k], r0["params"][k])
    full, part = lines(tmp_path / "full" / "metrics.jsonl"), lines(tmp_path / "part" / "metrics.jsonl")
    assert [m["iteration"] for m in full] == [m["iteration"] for m in part] == [0, 1, 2]  # one writer
    for a, b in zip(full, part):
        for k, v in a.items():
            if not k.startswith("time/"):
                assert b[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert len(lines(tmp_path / "full" / "eval.jsonl")) == 4  # before training + 3 iterations
    for f in ("report.md", "grid_after.png", "adapter/adapter.safetensors", "checkpoints/latest"):
        assert (tmp_path / "full" / f).exists(), f


def test_fsdp2_shapes_model_trains_and_reloads_in_one_process(tmp_path):
    """FSDP2 full fine-tuning of the embedded shapes model (tiny random config) on 2 processes launched
    by accelerate: 2 iterations equal one process's, the checkpoint and the export reload in one process,
    and a resume on the 2 processes puts weights and optimizer state back into the shards."""
    r0, r1 = launch("fsdp2", tmp_path, FSDP2, launcher="accelerate", timeout=400)
    root, block, text_encoder = r0["sharded"]
    assert r0["world"] == 2 and root.startswith("FSDP") and block.startswith("FSDP")
    assert not text_encoder.startswith("FSDP")  # frozen, called outside the module's forward: kept whole
    with one_thread():
        numel = sum(p.numel() for p in tiny_shapes(0).trainable_parameters())
        assert r0["local_numel"] + r1["local_numel"] == numel and r0["local_numel"] < numel  # sharded
        assert r1["params"] is None  # full weights on rank 0 only
        tr = Trainer(
            load_config(overrides=FSDP2),
            model=tiny_shapes(0),
            reward_fn=brightness_reward,
            prompts=PROMPTS,
            eval_sets={"eval": PROMPTS[:3]},
            run_dir=tmp_path / "one",
        )
        tr.run(progress=False)
        one = tr.model.adapter_state_dict()
        start = tiny_shapes(0).adapter_state_dict()
        assert max(float((one[k] - start[k]).abs().max()) for k in one) > 1e-2
        assert set(r0["params"]) == set(one)
        for k in one:
            torch.testing.assert_close(r0["params"][k], one[k], rtol=1e-4, atol=1e-5, msg=k)
        # the 2-process resume loaded exactly what was saved, then trained a third iteration
        for k in one:
            assert torch.equal(r0["resumed_params"][k], r0["params"][k]), k
        # the latest checkpoint (iteration 3, written under FSDP2) reloads in this single process
        again = resume(
            tmp_path / "run",
            model=tiny_shapes(0),
            reward_fn=brightness_reward,
            prompts=PROMPTS,
            eval_sets={"eval": PROMPTS[:3]},
        )
        assert again.iteration == 3 and again.dist.world == 1
        loaded = again.model.adapter_state_dict()
        for k in one:
            assert torch.equal(loaded[k], r0["params_after_resume"][k]), k
        assert len(again.optimizer.state_dict()["state"]) == len(again.params)
        # so does the exported adapter, in the shapes model's own format
        from flowdppo.models.shapes_model import ShapesFlowModel

        exported = ShapesFlowModel.from_config(TINY_SHAPES, seed=0)
        exported.load_adapter(tmp_path / "run" / "adapter")
        for k, v in exported.adapter_state_dict().items():
            assert torch.equal(v, r0["params_after_resume"][k]), k
    ms = lines(tmp_path / "run" / "metrics.jsonl")
    assert [m["iteration"] for m in ms] == [0, 1, 2]


def test_single_process_dist_is_a_no_op():
    d = Dist()
    assert d.world == 1 and d.is_main and not d.active
    assert d.share(12) == slice(0, 12)
    x = torch.arange(6)
    assert d.split(x) is x and d.all_gather_cat(x) is x
    idx, real = d.padded_share(5)
    assert idx.tolist() == [0, 1, 2, 3, 4] and real == 5


def test_padded_share_covers_every_item_once():
    n, world = 7, 3
    parts = [Dist(rank=r, world=world).padded_share(n) for r in range(world)]
    assert all(len(idx) == 3 for idx, _ in parts)  # equal work on every process
    assert torch.cat([idx[:real] for idx, real in parts]).tolist() == list(range(n))


def test_batches_must_split_over_the_processes(tmp_path):
    cfg = load_config(overrides=STEP)
    with pytest.raises(ConfigError, match="multiples of 5"):
        Trainer(
            cfg,
            model=ToyModel(0),
            reward_fn=brightness_reward,
            prompts=PROMPTS,
            eval_sets={},
            run_dir=tmp_path / "r",
            dist=Dist(rank=0, world=5),
        )


def test_gradient_checkpointing_is_honoured(tmp_path):
    """model.gradient_checkpointing switches the shapes model's transformer to checkpointing and leaves
    the update unchanged."""
    over = [
        "train.iterations=1",
        "train.prompts_per_iter=2",
        "train.group_size=2",
        "train.minibatch_size=4",
        "train.micro_batch_size=2",
        "train.rollout_batch_size=4",
        "sampling.num_steps=4",
        "steps.num_sde_steps=1",
        "reward.weights={bright: 1.0}",
        "log.tensorboard=false",
        "model.lora=false",
        "train.lr=0.01",
        "eval.ratio_noise_every=0",
        "train.trajectories_on_cpu=true",
    ]
    out = {}
    with one_thread():
        for gc in (False, True):
            tr = Trainer(
                load_config(overrides=over + [f"model.gradient_checkpointing={gc}"]),
                model=tiny_shapes(0),
                reward_fn=brightness_reward,
                prompts=PROMPTS,
                eval_sets={},
                run_dir=tmp_path / str(gc),
            )
            assert tr.model.module.transformer.gradient_checkpointing is gc
            tr.iteration_step(0)
            out[gc] = tr.model.adapter_state_dict()
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-5, atol=1e-6)


def test_cli_train_and_resume_under_torchrun(tmp_path):
    """`flowdppo train` on 2 processes (the shapes world and reward, a tiny random shapes model), then
    `--resume` for one more iteration: one writer, one report, one line of output."""
    from flowdppo.models.shapes_model import ShapesFlowModel

    tiny = {k: v for k, v in TINY_SHAPES.items() if k not in ("vocab", "max_tokens")}  # the world's vocabulary
    ShapesFlowModel.from_config(tiny, seed=0).save_pretrained(tmp_path / "model", half=False)
    sets = [
        "model.path=" + str(tmp_path / "model"),
        "log.run_dir=" + str(tmp_path / "runs"),
        "train.iterations=2",
        "train.prompts_per_iter=2",
        "train.group_size=4",
        "train.minibatch_size=8",
        "train.micro_batch_size=4",
        "train.rollout_batch_size=8",
        "sampling.num_steps=4",
        "steps.num_sde_steps=2",
        "eval.every=1",
        "eval.num_prompts=3",
        "eval.grid_prompts=2",
        "log.tensorboard=false",
        "log.progress=false",
        "model.lora_rank=4",
    ]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "flowdppo.cli",
        "train",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (
        ["--name", "cli", *[a for s in sets for a in ("--set", s)]],
        ["--resume", str(tmp_path / "runs" / "cli"), "--set", "train.iterations=3"],
    ):
        r = subprocess.run(torchrun + args, capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        assert r.stdout.count("run directory:") == 1, r.stdout
        assert "process 1 of 2" in r.stderr
    run = tmp_path / "runs" / "cli"
    assert [m["iteration"] for m in lines(run / "metrics.jsonl")] == [0, 1, 2]
    assert [m["iteration"] for m in lines(run / "eval.jsonl")] == [-1, 0, 1, 2]
    assert (run / "report.md").exists() and (run / "checkpoints" / "ckpt-000003").exists()


@pytest.mark.slow
def test_deepspeed_zero2_matches_one_process(tmp_path):
    """train.sharding=deepspeed through the shipped accelerate config (2 CPU processes): the step of one
    process. Needs `pip install deepspeed` (its CPU accelerator uses gloo); skipped without it."""
    pytest.importorskip("deepspeed")
    import yaml

    acc = yaml.safe_load((HERE.parent / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    acc.update(num_processes=2, use_cpu=True, main_process_port=_free_port())
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(acc))
    out = tmp_path / "two"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(tmp_path / "ds.yaml"),
            WORKER,
            "step",
            str(out),
            *STEP,
            "train.sharding=deepspeed",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    r0, r1 = (torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2))
    assert r0["world"] == 2 and torch.equal(r0["adv"], r1["adv"])
    with one_thread():
        tr = Trainer(
            load_config(overrides=STEP),
            model=ToyModel(0),
            reward_fn=brightness_reward,
            prompts=PROMPTS,
            eval_sets={},
            run_dir=tmp_path / "one",
        )
        m1 = tr.iteration_step(0)
    one = tr.model.adapter_state_dict()
    for k in one:
        torch.testing.assert_close(r0["params"][k], one[k], rtol=1e-4, atol=2e-5, msg=k)
    assert r0["metrics"]["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
