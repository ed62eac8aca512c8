import sys
import threading
from pathlib import Path

import pytest
import torch

from flowdppo.rewards.http import HTTPReward, decode_images, encode_images, make_server

sys.path.insert(0, str(Path(__file__).parent))
from toy import brightness_reward  # noqa: E402


def test_http_reward_round_trip():
    server = make_server(brightness_reward, "127.0.0.1", 0)
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    try:
        client = HTTPReward(f"http://127.0.0.1:{server.server_port}", timeout=30)
        images = torch.rand(5, 3, 8, 8)
        prompts = ["light", "dark", "light", "dark", "light"]
        got = client(prompts, images)
        quantised = decode_images(encode_images(images))
        want = brightness_reward(prompts, quantised)
        assert set(got) == set(want)
        for k in want:
            assert torch.allclose(got[k], want[k], atol=1e-6)
        with pytest.raises(Exception):
            client(prompts[:2], images)  # server answers 400: prompts and images disagree
    finally:
        server.shutdown()
        server.server_close()
