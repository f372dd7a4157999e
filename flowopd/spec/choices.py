"""Every list of choices a spec offers, defined once.

The schema's `Literal` types are built from these tuples, and the code that implements each choice reads the same
tuple (its registry's keys are checked against it by tests/spec/test_choices.py), so adding an estimator or a reward
means adding it here and to its registry, nowhere else. Plain data: importing this module costs nothing.
"""

TASK_FAMILIES = ("text", "objects", "quality")  # the tiny world's prompt families (flowopd.world.TASKS)
OBJECT_FAMILIES = ("single", "counting", "pair", "relation")  # GenEval categories that fit a 32 px canvas
FLAWS = ("noise", "blur")  # render degradations of the base's training pairs (flowopd.world.DEGRADATIONS)
TIME_SAMPLINGS = ("logit_normal", "uniform")  # noise levels of flow-matching training
DTYPES = ("fp32", "fp16", "bf16")

# sampler
SDE_KINDS = ("flow", "cps")  # Flow-GRPO's SDE, coefficients-preserving sampling (docs/method.md)
LOGPROB_REDUCTIONS = ("mean", "sum")  # how a step's Gaussian log-density reduces over elements
KL_FORMS = ("step", "flow_grpo")  # the exact step KL, or Flow-GRPO's D = KL (s - s') (docs/method.md)

# prompts and rewards
PROMPT_FILE_FORMATS = ("lines", "geneval_jsonl")
REWARDS = ("ocr", "objects", "quality", "pickscore", "remote")  # flowopd.rewards.REWARDS
REWARD_METRICS: dict[str, tuple[str, ...] | None] = {  # keys each reward returns; None: any (remote scorers)
    "ocr": ("score", "exact"),
    "objects": ("score", "strict"),
    "quality": ("score", "content", "finish"),
    "pickscore": ("score",),
    "remote": None,
}
REWARD_SETTINGS = ("ocr", "pickscore", "remote")  # rewards with a settings section of the same name
NEEDS_SETTINGS = ("pickscore", "remote")  # rewards that cannot run without their settings
TINY_WORLD_REWARDS = ("objects", "quality")  # score the tiny world's palette renders only
OCR_PAGE_MODES = ("auto", "sparse_text", "single_block", "single_line")

# teachers and the mixed baseline
TEACHER_METHODS = ("grpo", "nft")  # flowopd.methods.reward_trainers.REWARD_TRAINERS
ADVANTAGE_STDS = ("group", "global")  # the advantage's denominator: std over the group or over the step
ADVANTAGE_MODES = ("joint", "per_reward")  # mixed rewards: normalise the weighted sum, or each reward

# router
ROUTER_DEFAULTS = ("base", "error")  # router.default words besides a teacher name (so never teacher names)

# cold start
COLD_START_METHODS = ("merge", "sft", "none")
MERGE_MODES = ("linear", "task_arithmetic", "ties")
LORA_MERGES = ("product", "factors")
SFT_TARGET_SAMPLERS = ("evaluation", "rollout")  # the SFT targets' sampler: evaluation.sampler or its own

# on-policy distillation
ESTIMATORS = ("sampled", "analytic", "analytic_grad", "diffusion_opd", "velocity_mse", "reference_kl", "gkd")
PPO_ESTIMATORS = ("sampled", "analytic")  # a per-step reward as the advantage of PPO-clip
# the Flow-OPD reference code's own updates (its `reward_mode` kl_only and gkd), on Flow-GRPO's mean-reduced step
REFERENCE_ESTIMATORS = ("reference_kl", "gkd")
SDE_ESTIMATORS = ("sampled", "analytic", "analytic_grad", *REFERENCE_ESTIMATORS)  # need the SDE (noise_level > 0)
CREDITS = ("step", "element")
QUERY_DRAWS = ("uniform", "beta")
