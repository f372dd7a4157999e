"""Hard routing of prompts to teachers (docs/method.md#routing): each sample is distilled from ONE teacher.

Per sample, the rules are tried in order and the first match names the teacher:
- `task`: the prompt's task tag, i.e. the spec task whose prompt set it was drawn from (its dataset of origin,
  passed as `task=`), or `prompt.task` (the tiny world's family) when no origin is given;
- `keywords`: any keyword occurs in the prompt text as a whole word or phrase, case-insensitively
  ("sign" matches "A Sign that says", not "signal"; "left of" matches across the space);
- `regex`: `re.search(regex, text)` finds a match (case-sensitive unless the pattern says `(?i)`).
No rule matches: `default`, a teacher name, "base" (the base model teaches) or "error" (a configuration error).
The trainers route the whole prompt set before training, so an unroutable prompt fails at start-up, not mid-run.
"""

from __future__ import annotations

import re
from collections import Counter

from flowopd.spec.choices import ROUTER_DEFAULTS


class RoutingError(ValueError):
    """A prompt no rule matches while router.default is "error"."""


class Router:
    """rules: RouterRule-like objects (teacher + one of task / keywords / regex); teachers: the defined names."""

    def __init__(self, rules, default: str, teachers):
        self.teachers = list(teachers)
        self.default = default
        self.rules = []
        for i, rule in enumerate(rules):
            if rule.teacher not in self.teachers:
                raise ValueError(f"router rule {i}: unknown teacher {rule.teacher!r}; defined: {self._names()}")
            self.rules.append((rule.teacher, self._matcher(rule, i)))
        if default not in self.teachers and default not in ROUTER_DEFAULTS:
            raise ValueError(f"router default {default!r} is not a teacher, 'base' or 'error'; "
                             f"defined: {self._names()}")

    @classmethod
    def from_spec(cls, spec) -> Router:
        return cls(spec.router.rules, spec.router.default, spec.teachers)

    def _names(self) -> str:
        return ", ".join(map(repr, self.teachers))

    @staticmethod
    def _matcher(rule, i: int):
        given = [m for m in ("task", "keywords", "regex") if getattr(rule, m, None) is not None]
        if len(given) != 1:
            raise ValueError(f"router rule {i}: needs exactly one of task, keywords, regex (got {given or 'none'})")
        if rule.task is not None:
            return lambda text, task: task == rule.task
        if rule.keywords is not None:
            words = "|".join(re.escape(k) for k in rule.keywords)
            pattern = re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE)  # whole words, any case
        else:
            pattern = re.compile(rule.regex)
        return lambda text, task: pattern.search(text) is not None

    # -- routing ---------------------------------------------------------------------------------------------
    def match(self, prompt, task: str | None = None) -> str | None:
        """The first matching rule's teacher, or None."""
        text, tag = _text(prompt), task if task is not None else getattr(prompt, "task", None)
        return next((teacher for teacher, matches in self.rules if matches(text, tag)), None)

    def route(self, prompt, task: str | None = None) -> str:
        """Teacher name for one prompt (a Prompt or a plain string), or "base"; raises RoutingError on "error"."""
        teacher = self.match(prompt, task)
        if teacher is not None:
            return teacher
        if self.default == "error":
            raise RoutingError(f'no router rule matches prompt {_text(prompt)!r} and router.default is "error"')
        return self.default

    def route_all(self, prompts, tasks=None) -> list[str]:
        """route() for every prompt (tasks[i]: prompt i's task of origin); lists every unroutable prompt at once."""
        tasks = [None] * len(prompts) if tasks is None else list(tasks)
        if len(tasks) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(tasks)} task tags")
        routes = [self.match(p, t) for p, t in zip(prompts, tasks)]
        missing = [_text(p) for p, r in zip(prompts, routes) if r is None]
        if missing and self.default == "error":
            shown = ", ".join(map(repr, missing[:3])) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise RoutingError(f'{len(missing)} of {len(prompts)} prompts match no router rule and '
                               f'router.default is "error": {shown}')
        return [self.default if r is None else r for r in routes]

    def summary(self, prompts, tasks=None) -> dict[str, int]:
        """Prompts per teacher ("base" included when used), in teacher order."""
        counts = Counter(self.route_all(prompts, tasks))
        return {name: counts[name] for name in [*self.teachers, "base"] if counts[name]}


def format_summary(counts: dict[str, int]) -> str:
    """'routing 24 prompts: text 8, objects 8, quality 8' (what the trainers print before training)."""
    return f"routing {sum(counts.values())} prompts: " + ", ".join(f"{k} {v}" for k, v in counts.items())


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt.text
