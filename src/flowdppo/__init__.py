"""flowdppo: online RL for flow-matching image generators, built around Flow-DPPO (arXiv 2606.11025)."""

__version__ = "0.1.0"
