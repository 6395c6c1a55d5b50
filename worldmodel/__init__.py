"""GTMM world models: generative temporal models with memory (Gemici et al. 2017, arXiv 1702.04649).

Axis legend, used in every shape comment of this package:
    B batch, T time, C channels, H height, W width, Z latent size, D pose size, A number of actions,
    N memory slots, R read heads.

A training batch is a dict of tensors, the same whether it comes from recorded rollouts
(``rollouts.dataset``) or from the paper's sequence tasks (``envs.sequences``):
    obs          uint8   (B, T, H, W, C)   frames x_t
    prev_action  int64   (B, T)            a_{t-1}, the action that led to x_t; -1 = no action (episode start,
                                           action-free tasks)
    revisit      bool    (B, T)            x_t shows a place seen earlier (or, for sequence tasks, a frame that a
                                           perfect memory makes predictable)
    pose         float32 (B, T, D)         the env's pose for x_t (D may be 0 for action-free tasks)
"""
