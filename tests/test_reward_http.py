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
        client = HTTPReward(f"http://127.0.0.1:{server.server_port}", timeout=30, chunk_size=2)  # 3 requests
        images = torch.rand(5, 3, 8, 8)
        prompts = ["light", "dark", "light", "dark", "light"]
        got = client(prompts, images)
        quantised = decode_images(encode_images(images))
        want = brightness_reward(prompts, quantised)
        assert set(got) == set(want)
        for k in want:
            assert torch.allclose(got[k], want[k], atol=1e-6)
        with pytest.raises(ValueError, match="2 prompts for 5 images"):
            client(prompts[:2], images)
        with pytest.raises(Exception, match="400"):  # the server refuses a malformed request too
            client._post(prompts[:2], images)
    finally:
        server.shutdown()
        server.server_close()
