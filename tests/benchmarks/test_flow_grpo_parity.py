"""benchmarks/flow_grpo_parity.py against a stand-in with Flow-GRPO's signature (its file is not shipped).

The stand-in is written from the method's formulas in Flow-GRPO's notation (the step from the scheduler's sigmas,
std_dev_t = a sqrt(s / (1 - s)) with sigmas[1] at s = 1, the returned std before the sqrt(-dt) factor); a stand-in
that returns the step's whole std instead (so train_sd3.py's KL becomes the exact step KL, this project's earlier
form, 3.7-25x stronger) must be caught.
"""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import flow_grpo_parity

STAND_IN = '''
import math
import torch


def sde_step_with_logprob(scheduler, model_output, timestep, sample, noise_level=0.7, prev_sample=None,
                          generator=None):
    index = [scheduler.index_for_timestep(t) for t in timestep]
    sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
    sigma_next = scheduler.sigmas[[i + 1 for i in index]].view(-1, 1, 1, 1)
    dt = sigma_next - sigma
    std_dev_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, scheduler.sigmas[1], sigma)))
    v, x = model_output.float(), sample.float()
    mean = x + dt * (v + std_dev_t**2 / (2 * sigma) * (x + (1 - sigma) * v))
    std = std_dev_t * torch.sqrt(-dt)
    if prev_sample is None:
        noise = torch.randn(v.shape, generator=generator)
        prev_sample = mean + std * noise
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev_sample, log_prob.mean(dim=(1, 2, 3)), mean, RETURNED_STD
'''


@pytest.mark.parametrize("returned_std,agrees", [("std_dev_t", True), ("std", False)])
def test_parity_benchmark_agrees_with_flow_grpo_form_and_catches_a_difference(tmp_path, capsys, returned_std, agrees):
    reference = tmp_path / "sd3_sde_with_logprob.py"
    reference.write_text(STAND_IN.replace("RETURNED_STD", returned_std))
    code = flow_grpo_parity.main(["--reference", str(reference)])
    out = capsys.readouterr().out
    assert ("step mean" in out and "GRPO loss" in out) and (code == 0) == agrees, out
    errors = flow_grpo_parity.compare(flow_grpo_parity.load_reference(reference))
    if agrees:
        assert max(errors.values()) < 1e-5
    else:  # the KL term is the exact step KL: the loss differs, and the std check names it
        assert errors["step std"] > 1e-2 and errors["GRPO loss (policy + beta KL)"] > 1e-3 and math.isfinite(errors["GRPO loss (policy + beta KL)"])


def test_a_file_without_the_function_is_refused(tmp_path):
    reference = tmp_path / "other.py"
    reference.write_text("x = 1\n")
    with pytest.raises(SystemExit, match="has no sde_step_with_logprob"):
        flow_grpo_parity.load_reference(reference)
