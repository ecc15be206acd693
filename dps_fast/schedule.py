"""Stage arithmetic of DPS as pure functions of the optimizer step.

Steps are counted s = 1, 2, 3, ...; stage c = ceil(s / T). Odd stages explore
(dense update, scores accumulate), even stages exploit (masked update).
"""

EXPLORE = "explore"
EXPLOIT = "exploit"


def stage_of(step: int, stage_steps: int) -> int:
    """The stage number c = ceil(step / stage_steps) of optimizer step `step` (>= 1)."""
    return (step - 1) // stage_steps + 1


def phase_of(step: int, stage_steps: int) -> str:
    """"explore" in odd stages, "exploit" in even ones."""
    return EXPLORE if stage_of(step, stage_steps) % 2 == 1 else EXPLOIT


def stage_steps_from(total_steps: int, stage_ratio: float) -> int:
    """The published stage length T = int(total_steps * stage_ratio)."""
    return int(total_steps * stage_ratio)
