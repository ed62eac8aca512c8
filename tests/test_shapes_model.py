"""The embedded shapes model adapter (tiny random configs; the shipped weights only where present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowdppo.models.base import FlowModel
from flowdppo.models.shapes_model import ASSET_DIR, ShapesFlowModel, tokenize

VOCAB = [
    "a",
    "an",
    "one",
    "two",
    "three",
    "red",
    "blue",
    "green",
    "circle",
    "circles",
    "square",
    "triangle",
    "to",
    "the",
    "left",
    "right",
    "of",
    "above",
    "below",
]
TINY = {
    "num_layers": 2,
    "num_heads": 2,
    "head_dim": 8,
    "text_dim": 16,
    "text_layers": 1,
    "text_heads": 2,
    "max_tokens": 10,
    "vocab": VOCAB,
}
PROMPTS = ["a red circle to the left of a blue square", "three triangles", "", "a purple hexagon"]


def tiny(seed: int = 0) -> ShapesFlowModel:
    return ShapesFlowModel.from_config(TINY, seed=seed)


def inputs(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.rand(b, generator=g)


def randomize_lora(model: ShapesFlowModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_protocol_shapes_and_dtype():
    m = tiny()
    assert isinstance(m, FlowModel)
    x, s = inputs()
    cond = m.encode_prompts(PROMPTS)
    assert set(cond.tensors) == {"encoder_hidden_states", "pooled_projections"}
    assert cond["encoder_hidden_states"].shape == (4, 10, 16) and cond["pooled_projections"].shape == (4, 16)
    v = m.velocity(x.double(), s, cond)
    assert v.shape == (4, 3, 32, 32) and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert m.decode(
        torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 5, 1, 1).expand(1, 5, 1, 1)
    ).flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    sig = m.sigmas(10, "model")
    assert sig.shape == (11,) and sig.dtype == torch.float32 and sig[0] == 1 and sig[-1] == 0
    assert torch.allclose(sig, torch.linspace(1, 0, 11))  # default shift 1 = linear
    assert torch.allclose(m.sigmas(10, "uniform-shift", shift=3.0)[1], torch.tensor(0.9643), atol=1e-4)


def test_text_encoder_padding_and_empty_prompt():
    m = tiny()
    assert tokenize("A red circle, to the LEFT.") == ["a", "red", "circle", "to", "the", "left"]
    ids = m.module.text_encoder.ids(PROMPTS)
    assert ids[2].eq(0).all()  # empty prompt = all padding
    assert ids[3].tolist()[:3] == [m.module.text_encoder.index["a"], 1, 1]  # unknown words -> [UNK]
    cond = m.encode_prompts(PROMPTS)
    ehs = cond["encoder_hidden_states"]
    assert ehs[1, 2:].eq(0).all() and ehs[1, :2].abs().sum() > 0  # pads zeroed
    assert ehs[2].eq(0).all() and cond["pooled_projections"][2].eq(0).all()  # unconditional = zeros
    # batch composition does not change a prompt's embedding (padding is masked)
    alone = m.encode_prompts(PROMPTS[1:2])
    assert torch.allclose(alone["encoder_hidden_states"][0], ehs[1], atol=1e-6)


def test_timestep_is_1000_sigma():
    m = tiny()
    x, s = inputs()
    cond = m.encode_prompts(PROMPTS)
    seen = {}
    orig = m.module.transformer.forward

    def spy(*args, **kw):
        seen["t"] = kw["timestep"].clone()
        return orig(*args, **kw)

    m.module.transformer.forward = spy
    v = m.velocity(x, s, cond)
    assert torch.allclose(seen["t"], 1000 * s)
    direct = orig(
        hidden_states=x,
        encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"],
        timestep=1000 * s,
        return_dict=False,
    )[0]
    assert torch.equal(v, direct)
    v2 = m.velocity(x, s[0], cond)  # a 0-d sigma broadcasts
    assert torch.equal(v2[0], m.velocity(x, s[0].expand(4), cond)[0])


def test_lora_init_is_identity_and_disable_restores_base():
    m = tiny()
    x, s = inputs()
    cond = m.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = m.velocity(x, s, cond)
    m.add_lora(rank=4, alpha=8)
    names = [n for n, p in m.module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and n.startswith("transformer.") for n in names)
    assert len(m.trainable_parameters()) == len(names)
    assert any("add_q_proj" in n for n in names) and any("to_add_out" in n for n in names)
    with torch.no_grad():
        assert torch.equal(m.velocity(x, s, cond), base)  # B = 0 at init
        randomize_lora(m)
        adapted = m.velocity(x, s, cond)
        assert not torch.allclose(adapted, base)
        with m.disable_adapter():
            assert torch.equal(m.velocity(x, s, cond), base)
        assert torch.equal(m.velocity(x, s, cond), adapted)  # re-enabled on exit
    # gradients reach only the adapter
    m.velocity(x, s, cond).pow(2).mean().backward()
    assert all(p.grad is not None for p in m.trainable_parameters())
    assert all(p.grad is None for n, p in m.module.named_parameters() if "lora_" not in n)


def test_cfg():
    m = tiny()
    x, s = inputs()
    c1 = m.encode_prompts(PROMPTS, guidance_scale=1.0)
    cg = m.encode_prompts(PROMPTS, guidance_scale=4.0)
    assert "uncond_encoder_hidden_states" in cg and cg.batch_size == 4
    with torch.no_grad():
        v_c = m.velocity(x, s, c1)
        assert torch.equal(m.velocity(x, s, cg, guidance_scale=1.0), v_c)  # scale 1 = conditional
        v_u = m.velocity(x, s, m.encode_prompts([""] * 4))
        v_g = m.velocity(x, s, cg, guidance_scale=4.0)
        assert torch.allclose(v_g, v_u + 4.0 * (v_c - v_u), atol=1e-4)
        # a Cond without the unconditional rows still works (computed on the fly)
        assert torch.allclose(m.velocity(x, s, c1, guidance_scale=4.0), v_g, atol=1e-5)
        # the Cond survives the trainer's index / repeat
        sub = cg.index([1, 3]).repeat_interleave(2)
        assert torch.allclose(m.velocity(x[[1, 1, 3, 3]], s[[1, 1, 3, 3]], sub, 4.0), v_g[[1, 1, 3, 3]], atol=1e-4)


def test_adapter_save_load_roundtrip(tmp_path):
    m = tiny()
    m.add_lora(rank=4, alpha=8)
    randomize_lora(m, seed=3)
    x, s = inputs()
    cond = m.encode_prompts(PROMPTS)
    with torch.no_grad():
        ref = m.velocity(x, s, cond)
    m.save_adapter(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["kind"] == "lora"
    # in-memory state dict round trip
    m2 = tiny()
    m2.add_lora(rank=4, alpha=8)
    m2.load_adapter_state_dict(m.adapter_state_dict())
    # from disk onto a fresh base (adds the adapter itself)
    m3 = tiny()
    m3.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(m2.velocity(x, s, cond), ref)
        assert torch.equal(m3.velocity(x, s, cond), ref)
    with pytest.raises(KeyError):
        m2.load_adapter_state_dict({"nope": torch.zeros(1)})


def test_full_finetune_reference_and_base_save_load(tmp_path):
    m = tiny()
    x, s = inputs()
    cond = m.encode_prompts(PROMPTS)
    m.save_pretrained(tmp_path / "base", half=False)
    with torch.no_grad():
        base = m.velocity(x, s, cond)
        assert torch.equal(ShapesFlowModel.from_pretrained(tmp_path / "base").velocity(x, s, cond), base)
    assert len(m.trainable_parameters()) == len(list(m.module.parameters()))  # no adapter: everything
    m.enable_full_finetune()
    assert all(not p.requires_grad for p in m.module.text_encoder.parameters())
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.01)
        assert not torch.allclose(m.velocity(x, s, cond), base)
        with m.disable_adapter():
            assert torch.equal(m.velocity(x, s, cond), base)


def test_pretrain_smoke(tmp_path):
    pytest.importorskip("flowdppo.worlds.shapes")
    from flowdppo.tools.pretrain import pretrain

    tiny_cfg = {k: v for k, v in TINY.items() if k != "vocab"}
    out = tmp_path / "model"
    res = pretrain(
        out,
        steps=20,
        batch_size=8,
        lr=1e-3,
        seed=0,
        model_config=tiny_cfg,
        ckpt_dir=tmp_path / "ckpt",
        ckpt_every=10,
        threads=None,
        eval_samples_per_prompt=1,
        grid=False,
        progress=False,
    )
    assert res["steps"] == 20 and 0.0 <= res["eval"][1.0]["overall"] <= 1.0
    assert (tmp_path / "ckpt" / "step_0000010" / "model.safetensors").exists()
    m = ShapesFlowModel.from_pretrained(out)
    x, s = inputs(2)
    v = m.velocity(x, s, m.encode_prompts(["three triangles", "a red circle"]))
    assert v.shape == (2, 3, 32, 32) and torch.isfinite(v).all()
    # resume continues from last.pt
    res2 = pretrain(
        out,
        steps=25,
        batch_size=8,
        seed=0,
        model_config=tiny_cfg,
        ckpt_dir=tmp_path / "ckpt",
        resume=True,
        threads=None,
        eval_samples_per_prompt=1,
        grid=False,
        progress=False,
    )
    assert res2["steps"] == 25


@pytest.mark.skipif(not (ASSET_DIR / "model.safetensors").exists(), reason="shipped weights not built yet")
def test_shipped_weights_load():
    m = ShapesFlowModel.from_pretrained()
    x, s = inputs(2)
    with torch.no_grad():
        v = m.velocity(x, s, m.encode_prompts(["three triangles", "a red circle"]))
    assert v.shape == (2, 3, 32, 32) and torch.isfinite(v).all()


def test_position_codes_weigh_like_tokens_and_make_order_visible():
    from flowdppo.models.shapes_model import WordEncoder, position_codes

    pos = position_codes(10, 64)
    assert pos.shape == (10, 64)
    assert abs(float(pos.pow(2).mean()) - 1.0) < 0.05  # unit variance per entry, like nn.Embedding's tokens
    d = torch.cdist(pos, pos) + 100 * torch.eye(10)
    assert float(d.min()) > 2.0  # every position has its own code, far from its neighbours
    with pytest.raises(ValueError, match="text_pos_init"):
        position_codes(10, 64, "rope")
    # a bag of words: the same words in another order. The image transformer's attention sees the text
    # states as a set, so compare them as sets (mean distance of each state to its nearest in the other):
    # with sinusoidal codes a random encoder already tells the swapped prompt apart about as well as a
    # prompt with another word; with the old N(0, 0.02) init it barely does.
    a, b, c = (
        "a circle to the left of a square",
        "a square to the left of a circle",
        "a circle to the left of a triangle",
    )
    gaps = {}
    for init in ("sinusoidal", "small"):
        torch.manual_seed(0)
        enc = WordEncoder(VOCAB + ["triangle"], 32, 2, 2, 10, init).eval()
        with torch.no_grad():
            h, _ = enc(enc.ids([a, b, c]))
        n = len(a.split())
        ab, ac = (float(torch.cdist(h[0, :n], h[j, :n]).min(dim=1).values.mean()) for j in (1, 2))
        gaps[init] = ab / ac
    assert gaps["sinusoidal"] > 0.5 and gaps["small"] < 0.1, gaps


def test_pretrain_options_init_from_and_category_weights(tmp_path):
    import numpy as np

    from flowdppo.tools.pretrain import make_batch, order_metrics, parse_category_weights, pretrain
    from flowdppo.worlds import shapes

    w = parse_category_weights("position=3,color_attr=0")
    assert w == [3.0 if c == "position" else 0.0 if c == "color_attr" else 1.0 for c in shapes.CATEGORIES]
    with pytest.raises(ValueError, match="CATEGORY=WEIGHT"):
        parse_category_weights("positions=2")
    only_pos = [1.0 if c == "position" else 0.0 for c in shapes.CATEGORIES]
    prompts, x0 = make_batch(np.random.default_rng(0), 16, p_uncond=0.0, weights=only_pos)
    assert x0.shape == (16, 3, 32, 32) and all(shapes.parse_prompt(p).category == "position" for p in prompts)
    with pytest.raises(ValueError, match="category weights"):
        make_batch(np.random.default_rng(0), 2, weights=[1.0])

    tiny_cfg = {k: v for k, v in TINY.items() if k != "vocab"}
    src = ShapesFlowModel.from_config(tiny_cfg, seed=5)
    src.save_pretrained(tmp_path / "src", half=False)
    kw = dict(batch_size=4, model_config=tiny_cfg, threads=None, grid=False, progress=False, eval_samples_per_prompt=1)
    # 0 optimizer steps: the written model is the initialisation
    pretrain(
        tmp_path / "a", steps=0, ckpt_dir=tmp_path / "ca", init_from=tmp_path / "src", init_parts="transformer", **kw
    )
    got = ShapesFlowModel.from_pretrained(tmp_path / "a").module
    ref = ShapesFlowModel.from_config(tiny_cfg, seed=0).module  # pretrain's own seed for the fresh parts
    for n, p in got.transformer.state_dict().items():
        assert torch.allclose(p, src.module.transformer.state_dict()[n].half().float()), n
    for n, p in got.text_encoder.state_dict().items():
        assert torch.allclose(p, ref.text_encoder.state_dict()[n].half().float()), n
    # periodic evaluation writes one record per evaluation (step 0 included) with the order diagnostics
    pretrain(
        tmp_path / "b", steps=4, ckpt_dir=tmp_path / "cb", eval_every=2, eval_every_samples=1, category_weights=w, **kw
    )
    recs = [json.loads(line) for line in (tmp_path / "cb" / "evals.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 2, 4]
    assert set(recs[0]["per_category"]) == set(shapes.CATEGORIES)
    om = order_metrics(ShapesFlowModel.from_pretrained(tmp_path / "b"), samples_per_prompt=1)
    assert all(0.0 <= om[k] <= 1.0 for k in ("position_order", "position_reversed", "binding", "binding_swapped"))
    assert om["swap_sensitivity"] > 0.0


CANDIDATE = Path(__file__).resolve().parent.parent / "candidates" / "shapes_model_v2"


@pytest.mark.skipif(not (CANDIDATE / "model.safetensors").exists(), reason="candidate weights not in this checkout")
def test_candidate_v2_loads_and_tells_swapped_prompts_apart():
    m = ShapesFlowModel.from_pretrained(CANDIDATE)
    assert m.config["text_layers"] == 3 and m.config["text_pos_init"] == "sinusoidal"
    x, s = inputs(2)
    with torch.no_grad():
        c = m.encode_prompts(["a red circle and a green square", "a green circle and a red square"])
        v = m.velocity(x[:1].expand(2, -1, -1, -1), s[:1].expand(2), c)
    assert torch.isfinite(v).all() and float((v[0] - v[1]).abs().max()) > 0.05
