"""model.lora_forward: LoRA linears as one matmul with the merged weight, the same values and gradients as
peft's separate path (to fp32 rounding), peft's path wherever the merged one does not apply."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from flowdppo.config import ConfigError, load_config
from flowdppo.models.base import peft_adapter_disabled
from flowdppo.models.lora_forward import (
    _MergedLinear,
    lora_layers,
    resolve_lora_forward,
    use_merged_lora_forward,
)
from flowdppo.models.shapes_model import ShapesFlowModel
from flowdppo.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_shapes_pipeline import SMALL_RUN, TINY  # noqa: E402
from toy import brightness_reward  # noqa: E402


def _peft_net(dropout=0.0):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 7, bias=False))
    net = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=dropout), net)
    for n, p in net.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)  # B = 0 at init would hide a wrong B gradient or a missing LoRA term
        p.requires_grad_("lora_" in n)
    return net


def _grads(net, x):
    x = x.clone().requires_grad_(True)
    y = net(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    g = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), g


def test_merged_forward_matches_peft_values_and_gradients():
    x = torch.randn(3, 5, 12)  # a leading token axis, as in a transformer
    ref_y, ref_gx, ref_g = _grads(_peft_net(), x)
    net = _peft_net()
    assert use_merged_lora_forward(net) == 2
    y, gx, g = _grads(net, x)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    assert set(g) == set(ref_g) and any("lora_A" in k for k in g) and any("lora_B" in k for k in g)
    for k in g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-5, atol=1e-6)
    # the layers really take the merged path (not peft's, which would also match)
    calls = []
    orig = _MergedLinear.forward
    _MergedLinear.forward = staticmethod(lambda ctx, *a: calls.append(1) or orig(ctx, *a))
    try:
        net(x)
    finally:
        _MergedLinear.forward = staticmethod(orig)
    assert len(calls) == 2


def test_merged_linear_gradcheck_float64():
    torch.manual_seed(0)
    args = (
        torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 6, dtype=torch.float64, requires_grad=True),
        torch.randn(5, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 6, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
        1.7,
    )
    assert torch.autograd.gradcheck(_MergedLinear.apply, args)


def test_disabled_adapter_and_unsupported_layers_use_peft():
    x = torch.randn(4, 12)
    net = _peft_net()
    with torch.no_grad():
        base = net[2].base_layer(net[1](net[0].base_layer(x)))
    use_merged_lora_forward(net)
    with torch.no_grad(), peft_adapter_disabled(net):
        assert torch.equal(net(x), base)  # the reference policy: exactly the base weights
    # dropout > 0 (train mode): peft's own path, bit for bit
    ref, net_d = _peft_net(dropout=0.5), _peft_net(dropout=0.5)
    use_merged_lora_forward(net_d)
    torch.manual_seed(3)
    a = ref(x)
    torch.manual_seed(3)
    assert torch.equal(net_d(x), a)

    # half-precision base weights with fp32 LoRA weights (a bf16 model): peft's path (it casts)
    def half_base():
        n = _peft_net()
        for name, p in n.named_parameters():
            if "lora_" not in name:
                p.data = p.data.to(torch.bfloat16)
        return n

    net_h = half_base()
    use_merged_lora_forward(net_h)
    with torch.no_grad():
        assert torch.equal(net_h[0](x.bfloat16()), half_base()[0](x.bfloat16()))


def test_resolve_lora_forward():
    assert resolve_lora_forward("auto", torch.float32, "ddp", 1) == "merged"
    assert resolve_lora_forward("auto", torch.bfloat16, "ddp", 1) == "separate"
    assert resolve_lora_forward("auto", torch.float32, "deepspeed", 2) == "separate"
    assert resolve_lora_forward("auto", torch.float32, "deepspeed", 1) == "merged"
    assert resolve_lora_forward("auto", torch.float32, "fsdp2", 2) == "separate"  # untested there: explicit only
    assert resolve_lora_forward("auto", torch.float32, "ddp", 2) == "merged"
    assert resolve_lora_forward("merged", torch.float32, "fsdp2", 2) == "merged"
    assert load_config().model.lora_forward == "auto"  # the default
    assert resolve_lora_forward("separate", torch.float32, "ddp", 1) == "separate"
    with pytest.raises(ValueError, match="deepspeed on several processes"):
        resolve_lora_forward("merged", torch.float32, "deepspeed", 2)
    with pytest.raises(ValueError, match="valid: auto, merged, separate"):
        resolve_lora_forward("fused", torch.float32, "ddp", 1)
    with pytest.raises(ConfigError, match="model.lora_forward"):
        load_config(overrides=["model.lora_forward=fused"])


def _trainer(tmp_path, mode, name):
    m = ShapesFlowModel.from_config(TINY, seed=0)
    torch.manual_seed(0)  # the LoRA A init
    m.add_lora(4, 8.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0: the LoRA term is in every forward from the start
        for n, p in m.module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=gen)
    over = ["eval.every=0", "eval.ratio_noise_every=0", "train.lr=1e-2", "reward.weights={bright: 1.0}"]
    over.append(f"model.lora_forward={mode}")
    cfg = load_config(overrides=SMALL_RUN + over)
    return Trainer(cfg, model=m, reward_fn=brightness_reward, run_dir=tmp_path / name)


def test_trainer_routes_lora_and_the_reused_anchor_stays_exact(tmp_path):
    merged = _trainer(tmp_path, "auto", "merged")
    assert merged.lora_forward == "merged"
    layers = lora_layers(merged.model.module)
    assert layers and all(hasattr(m, "_peft_forward") for m in layers)
    m = merged.iteration_step(0)
    # the rollout and the training forwards both take the merged path: the reused anchor is exact
    assert m["anchor/reused"] == 1.0 and m["replay/logp_abs_diff_max"] == 0.0
    assert m["first_mb/ratio_min"] == 1.0 and m["first_mb/ratio_max"] == 1.0 and m["first_mb/kl_max"] == 0.0
    separate = _trainer(tmp_path, "separate", "separate")
    assert separate.lora_forward == "separate"
    assert not any(hasattr(m, "_peft_forward") for m in lora_layers(separate.model.module))
    m_sep = separate.iteration_step(0)
    assert m["grad_norm"] > 0  # a real update
    # the same update to fp32 rounding
    assert m["policy_loss"] == pytest.approx(m_sep["policy_loss"], rel=1e-4, abs=1e-7)
    for k, v in merged.model.adapter_state_dict().items():
        torch.testing.assert_close(v, separate.model.adapter_state_dict()[k], rtol=1e-4, atol=1e-6)
