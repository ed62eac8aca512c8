"""Rewards over HTTP (kept for imports and ``python -m flowdppo.rewards.http``): the client lives in
:mod:`flowdppo.rewards.client`, the server in :mod:`flowdppo.rewards.server`."""

from flowdppo.rewards.client import HTTPReward, RewardServerError, decode_images, encode_images
from flowdppo.rewards.server import Limits, main, make_server

__all__ = ["HTTPReward", "RewardServerError", "Limits", "decode_images", "encode_images", "make_server", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
