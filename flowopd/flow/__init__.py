"""Flow matching's sampling math: the sigma schedule, the Flow-GRPO SDE step and its log-density, CPS, and the
sampler that draws images (ODE or SDE) with their trajectories."""
