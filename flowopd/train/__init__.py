"""What every trainer shares: the trainer skeleton and its driver (step loop, EMA, checkpoints, the artifact), the
trained policy and its frozen reference, training state, seeded per-step randomness, rollouts with their rewards and
advantages, and the shared losses (PPO-clip, flow matching)."""
