"""How well a batch of the `sampled` OPD estimator points along grad KL, as the step's dimension grows.

Run:  .venv/bin/python benchmarks/bench_estimator_noise.py [--kl 0.005] [--repeats 20]     (2-8 minutes, ~2 GB)

One Gaussian SDE step, student N(mu_S, std^2 I), teacher N(mu_T, std^2 I) in D dimensions, with KL per element
`--kl` (the tiny pipeline's OPD runs log 0.002-0.03). With the student mean as the parameter, the batch estimate of
the policy gradient with the trainer's own reward and loss (flowopd.methods.opd_trainer.step_rewards / step_loss, sum reduction) is
compared with the exact grad KL by cosine similarity, averaged over repeats, for both credits: `step` (one reward
per sample, the paper's) and `element` (each element's log-ratio on its own log-prob). `analytic_grad` differentiates the KL
itself and has cosine 1 by construction. D = 3072 is the tiny world's 32 x 32 x 3 pixels; 65,536 is SD3.5's
64 x 64 x 16 latents at 512 px.
"""

import argparse

import torch

from flowopd.flow.sde import gaussian_log_prob, step_kl
from flowopd.methods.opd_objectives import step_loss, step_rewards


def cosine_to_grad_kl(dim: int, batch: int, kl_per_element: float, generator: torch.Generator,
                      credit: str = "step") -> float:
    std = torch.ones(batch, 1)
    delta = torch.randn(dim, generator=generator)
    delta *= (2 * kl_per_element * dim) ** 0.5 / delta.norm()  # ||mu_S - mu_T||^2 / 2 = kl * D
    mu_student = torch.zeros(dim, requires_grad=True)
    mean = mu_student.expand(batch, dim)
    teacher = (-delta).expand(batch, dim)
    x_next = (mean + std * torch.randn(batch, dim, generator=generator)).detach()
    per = "none" if credit == "element" else "sum"  # element credit: per-element log-probs and rewards
    old = gaussian_log_prob(x_next, mean.detach(), std, per)
    rewards = step_rewards("sampled", x_next, mean.detach(), teacher, std, old, "sum", credit)
    loss, _ = step_loss("sampled", gaussian_log_prob(x_next, mean, std, per), old, mean, teacher, std, rewards,
                        1e-4, "sum")
    (estimate,) = torch.autograd.grad(loss.mean(), mu_student)
    (exact,) = torch.autograd.grad(step_kl(mean[:1], teacher[:1], std[:1], "sum").sum(), mu_student)
    return torch.nn.functional.cosine_similarity(estimate, exact, dim=0).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kl", type=float, default=0.005, help="KL per element between the two steps")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    print(f"KL per element {args.kl}; mean cosine(batch estimate, grad KL) over {args.repeats} repeats")
    print(f"{'credit':>8} {'dimension':>10} " + " ".join(f"{f'batch {b}':>10}" for b in (16, 128, 1024)))
    for credit in ("step", "element"):
        for dim in (6, 3072, 65536):
            cells = []
            for batch in (16, 128, 1024):
                values = [cosine_to_grad_kl(dim, batch, args.kl, generator, credit) for _ in range(args.repeats)]
                cells.append(f"{sum(values) / len(values):10.3f}")
            print(f"{credit:>8} {dim:>10} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
