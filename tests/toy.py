"""A toy FlowModel for trainer tests: an MLP velocity field with a real peft LoRA adapter."""

from __future__ import annotations

import zlib

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from flowdppo.core.sde import uniform_shift_sigmas
from flowdppo.models.base import Cond, peft_adapter_disabled


class _Net(nn.Module):
    def __init__(self, dim: int, emb: int = 8, hidden: int = 64):
        super().__init__()
        self.to_q = nn.Linear(dim + emb + 1, hidden)
        self.to_out = nn.Linear(hidden, dim)

    def forward(self, x, emb, sigma):
        h = torch.cat([x.flatten(1), emb, sigma[:, None]], 1)
        return self.to_out(torch.nn.functional.silu(self.to_q(h))).view_as(x)


class ToyModel:
    latent_shape = (3, 4, 4)

    def __init__(self, seed: int = 0, rank: int = 4):
        torch.manual_seed(seed)
        c, h, w = self.latent_shape
        self.module = _Net(c * h * w)
        for p in self.module.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["to_q", "to_out"]), self.module)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def encode_prompts(self, prompts, guidance_scale=1.0):
        g = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        return Cond({"emb": torch.stack([torch.randn(8, generator=gi) for gi in g])})

    def velocity(self, x, sigma, cond, guidance_scale=1.0):
        return self.module(x.float(), cond["emb"], sigma.float()).float()

    def decode(self, x):
        return ((x.view(x.shape[0], 3, 4, 4) + 1) / 2).clamp(0, 1)

    def sigmas(self, num_steps, schedule):
        return uniform_shift_sigmas(num_steps, 1.0)

    def disable_adapter(self):
        return peft_adapter_disabled(self.module)

    def trainable_parameters(self):
        return [p for n, p in self.module.named_parameters() if "lora_" in n]

    def adapter_state_dict(self):
        return {n: p.detach().clone() for n, p in self.module.named_parameters() if "lora_" in n}

    def load_adapter_state_dict(self, state):
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def save_adapter(self, directory):
        import os

        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file(self.adapter_state_dict(), os.path.join(directory, "adapter.safetensors"))


def brightness_reward(prompts, images):
    """Reward = mean brightness; prompts that start with 'dark' want the opposite."""
    b = images.mean(dim=(1, 2, 3))
    sign = torch.tensor([-1.0 if p.startswith("dark") else 1.0 for p in prompts])
    return {"bright": b * sign, "red": images[:, 0].mean(dim=(1, 2))}


PROMPTS = ["light a", "light b", "dark c", "dark d", "light e", "dark f"]
