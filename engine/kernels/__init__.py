"""Attention kernels: a PyTorch reference path (the oracle, and what CPU runs) behind a dispatcher."""
