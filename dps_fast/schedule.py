"""Stage arithmetic of DPS as pure functions of the optimizer step.

Steps are counted s = 1, 2, 3, ...; stage c = ceil((s - start) / T), where
`start` is the number of steps taken before the schedule began (0, unless
stage_steps was changed mid-run: a new schedule then begins after the steps
taken so far). Odd stages explore (dense update, scores accumulate), even
stages exploit (masked update). A stage is named by its first step
(`stage_start`): unlike c, that name is never reused by a later schedule.
"""

EXPLORE = "explore"
EXPLOIT = "exploit"


def stage_of(step: int, stage_steps: int, start: int = 0) -> int:
    """The stage number c = ceil((step - start) / stage_steps) of step `step` (> start)."""
    return (step - start - 1) // stage_steps + 1


def phase_of(step: int, stage_steps: int, start: int = 0) -> str:
    """"explore" in odd stages, "exploit" in even ones."""
    return EXPLORE if stage_of(step, stage_steps, start) % 2 == 1 else EXPLOIT


def stage_start(step: int, stage_steps: int, start: int = 0) -> int:
    """The first step of the stage that holds step `step`: the stage's name."""
    return start + (stage_of(step, stage_steps, start) - 1) * stage_steps + 1


def stage_steps_from(total_steps: int, stage_ratio: float) -> int:
    """The published stage length T = int(total_steps * stage_ratio)."""
    return int(total_steps * stage_ratio)
