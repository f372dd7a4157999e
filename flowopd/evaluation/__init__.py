"""Benchmarks: sample each task's test prompts with the evaluation sampler, score them with the task's reward, and
flag samples that ignore their prompt (a reward exploit)."""
