"""Smoke test of ``flowdppo bench speed`` at toy sizes: it runs and its figures are consistent."""

import json
import math

import pytest

from flowdppo.tools import bench_speed


def _check_geometry(out: dict) -> None:
    for preset in bench_speed.PRESETS:
        s = out[preset]
        assert s["n"] == 1
        assert all(s["seconds"][k] > 0 for k in ("iteration", "rollout", "anchor", "train"))
        # the phases are parts of the iteration
        assert sum(s["seconds"][k] for k in bench_speed.PHASES) <= s["seconds"]["iteration"] * 1.001
        assert set(s["flops"]) == {"rollout", "anchor", "train"} and all(v > 0 for v in s["flops"].values())
        for p, frac in s["fraction_of_peak"].items():
            assert math.isclose(frac * out["_peak"], s["flops"][p] / s["seconds"][p], rel_tol=1e-9)
    r = out["dppo_over_grpo"]
    assert math.isclose(
        r["ratio_of_medians"], out["flow-dppo"]["seconds"]["iteration"] / out["flow-grpo"]["seconds"]["iteration"]
    )


def test_bench_speed_smoke(tmp_path, capsys):
    path = tmp_path / "speed.json"
    rc = bench_speed.main(
        [
            "--smoke",
            "--iterations",
            "1",
            "--warmup",
            "0",
            "--procs",
            "",
            "--compare-anchor",
            "--quiet",
            "--json",
            str(path),
        ]
    )
    assert rc == 0
    res = json.loads(path.read_text())
    assert res["peak_mm_flop_per_s"] > 0 and res["smoke"] is True
    for geo in ("shapes", "sd3"):
        _check_geometry(dict(res[geo], _peak=res["peak_mm_flop_per_s"]))
    # the replayed anchor makes a forward per trained step of every sample: more than the reused one's check
    replayed = res["shapes"][bench_speed.REPLAYED]
    assert replayed["flops"]["anchor"] > res["shapes"]["flow-dppo"]["flops"]["anchor"]
    r = res["shapes"]["anchor_as_configured_over_replayed"]
    assert math.isclose(
        r["ratio_of_medians"], res["shapes"]["flow-dppo"]["seconds"]["iteration"] / replayed["seconds"]["iteration"]
    )
    # same geometry and steps: Flow-DPPO counts the same model FLOPs as Flow-GRPO
    assert res["shapes"]["flow-dppo"]["flops"] == res["shapes"]["flow-grpo"]["flops"]
    text = capsys.readouterr().out
    assert "Flow-DPPO / Flow-GRPO iteration" in text and "peak fp32 mm" in text


@pytest.mark.parametrize("anchor", ["replay", "auto"])
def test_phase_flops_count_the_forwards(tmp_path, anchor):
    extra = [f"train.anchor={anchor}", "train.ref_kl_samples=0", "train.ref_kl_every=1"]
    tr = bench_speed.build_trainer("sd3", "flow-dppo", str(tmp_path / "run"), smoke=True, extra=extra)
    per = bench_speed.forward_flops(tr)
    # LoRA backward: input gradients plus the adapters' weight gradients, about one more forward
    assert per["forward"] > 0 and 1.5 * per["forward"] < per["forward_backward"] < 3.5 * per["forward"]
    f = bench_speed.phase_flops(tr, per)
    b, n, s = 4, 4, 2  # smoke: 2 x 2 samples, 4 steps, 2 SDE steps
    assert f["rollout"] == b * n * per["forward"]
    # a replay of every trained step, or the reused anchor's spot check (4 samples, one step); + the reference
    anchor_forwards = b * s if anchor == "replay" else 4
    assert tr.reuse_anchor == (anchor == "auto")
    assert f["anchor"] == (anchor_forwards + b * s) * per["forward"]
    # a reused anchor with one optimizer step also keeps the rollout's graphs: training is the backward only
    assert tr.keep_rollout_graph == (anchor == "auto")
    backward_only = per["forward_backward"] - per["forward"]
    assert f["train"] == b * s * (backward_only if anchor == "auto" else per["forward_backward"])
    # measured every 10 iterations, the reference forwards are not in the median iteration the FLOPs divide
    sparse = bench_speed.build_trainer(
        "sd3", "flow-dppo", str(tmp_path / "sparse"), smoke=True, extra=[*extra, "train.ref_kl_every=10"]
    )
    assert bench_speed.phase_flops(sparse, per)["anchor"] == anchor_forwards * per["forward"]


def test_tensor_bytes_counts_each_storage_once():
    import torch

    a = torch.zeros(10, 4)
    assert bench_speed.tensor_bytes({"a": a, "view": a[2:], "b": [torch.zeros(3, dtype=torch.float64)]}) == 160 + 24


@pytest.mark.slow
def test_bench_speed_memory_and_busy(tmp_path):
    path = tmp_path / "speed.json"
    rc = bench_speed.main(
        [
            "--smoke",
            "--models",
            "shapes",
            "--iterations",
            "1",
            "--warmup",
            "0",
            "--busy",
            "--quiet",
            "--json",
            str(path),
        ]
    )
    assert rc == 0
    res = json.loads(path.read_text())
    mem = res["memory"]["per_world"]
    assert [r["world"] for r in mem["1"]] == [1] and sorted(r["rank"] for r in mem["2"]) == [0, 1]
    assert all(r["bytes"]["trajectories"] > 0 and "anchor" in r["bytes"] for reps in mem.values() for r in reps)
    busy = res["shapes"]["busy"]
    assert busy["over_quiet"] > 0
    # the busy run is a fresh process that chose its own wait policy (this process's choice is not inherited)
    assert sum(bool(busy["env"].get(k)) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")) == 1


def test_save_sd3_writes_the_benchmark_geometry_that_the_sd3_adapter_trains(tmp_path, capsys):
    """``--save-sd3`` writes a real SD3 pipeline of the benchmark's geometry (16x8x8 latents, 77 CLIP tokens),
    refuses a non-empty folder, and ``--sd3-path`` then trains on it (a smoke iteration)."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the tiny pipelines need transformers >= 5")
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "sd3"
    assert bench_speed.main(["--save-sd3", str(out)]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out))
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    assert pipe.tokenizer.model_max_length == 77 and pipe.transformer.config.num_layers == 4
    assert pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim == 128
    with pytest.raises(SystemExit, match="not empty"):
        bench_speed.main(["--save-sd3", str(out)])
    res = tmp_path / "speed.json"
    args = ["--models", "sd3", "--sd3-path", str(out), "--smoke", "--procs", "", "--iterations", "1", "--warmup", "0"]
    assert bench_speed.main([*args, "--quiet", "--json", str(res)]) == 0
    sd3 = json.loads(res.read_text())["sd3"]
    assert all(sd3[p]["seconds"]["iteration"] > 0 for p in ("flow-dppo", "flow-grpo"))
