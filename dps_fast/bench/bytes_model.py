"""The bytes model of `dps-fast bench`: the fewest bytes each row's work must
move through memory, per entry (below for fp32 parameters, gradients and
state; step_bytes takes other storage sizes: a bf16 parameter and gradient
move 2 bytes each, a bf16 state entry 2 per read or write). GB/s
= these bytes / the median time; the same model serves every
implementation of a row's work, so GB/s compares implementations of the
same work and, against the copy bandwidth measured in the same run, shows
how near each comes to the memory-bound floor.

Defined here once; the report's notes and the plot render it from these
numbers (describe()).
"""

PARAM_PASSES = 3  # read the parameter and the gradient, write the parameter
STATE_PASSES = 4  # read and write exp_avg and exp_avg_sq
ADAMW_BYTES = PARAM_PASSES * 4.0 + STATE_PASSES * 4.0  # 28: read p, g, m, v; write p, m, v
SCORE_BYTES = 8.0         # explore: read and write the score
MASK_BYTES = 1 / 8        # exploit: read one packed mask bit
SELECT_BYTES = 4 + 1 / 8  # boundary: read the score, write the mask bit

# Extra bytes per managed entry in each phase of a step row (fp32 state); plain
# (unmanaged) entries always count ADAMW_BYTES. "exploit freeze" counts as
# "exploit", though it could in principle skip the traffic of masked-out entries.
PHASE_BYTES = {"dense": 0.0, "explore": SCORE_BYTES, "exploit": MASK_BYTES, "exploit freeze": MASK_BYTES}

# The copy bandwidth that "% copy" divides by counts a tensor copy as this
# many times its bytes (read + write; see timing.copy_bandwidth).
COPY_FACTOR = 2
COPY_RULE = f"{COPY_FACTOR} x bytes of a large tensor copy per second"


def step_bytes(managed, plain, phase, param_bytes=4, state_bytes=4):
    """The bytes model of one optimizer step over `managed` DPS entries and `plain` AdamW
    entries whose parameter (and gradient) and state entries take `param_bytes` and
    `state_bytes`: read p, g, m, v and write p, m, v, plus the phase's score or mask bit."""
    adamw = PARAM_PASSES * param_bytes + STATE_PASSES * state_bytes
    extra = PHASE_BYTES[phase] * (state_bytes / 4 if phase == "explore" else 1)  # the score is a state entry
    return managed * (adamw + extra) + plain * adamw


def select_bytes(managed):
    """The bytes model of one stage boundary: the selection over `managed` entries."""
    return managed * SELECT_BYTES


def describe():
    """The model in one sentence, from the numbers above."""
    return (f"AdamW {ADAMW_BYTES:g} B per entry (read p, g, m, v; write p, m, v), explore +{SCORE_BYTES:g} B "
            f"(score read + write), exploit +{MASK_BYTES:g} B (packed mask bit) on managed entries; "
            f"selection {SELECT_BYTES:g} B per managed entry (read score, write mask bit)")
