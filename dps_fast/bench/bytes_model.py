"""The bytes model of `dps-fast bench`: the fewest bytes each row's work must
move through memory, per entry (fp32 parameters, gradients and state). GB/s
= these bytes / the median time; the same model serves every
implementation of a row's work, so GB/s compares implementations of the
same work and, against the copy bandwidth measured in the same run, shows
how near each comes to the memory-bound floor.

Defined here once; the report's notes and the plot render it from these
numbers (describe()).
"""

ADAMW_BYTES = 28.0        # read p, g, m, v; write p, m, v
SCORE_BYTES = 8.0         # explore: read and write the score
MASK_BYTES = 1 / 8        # exploit: read one packed mask bit
SELECT_BYTES = 4 + 1 / 8  # boundary: read the score, write the mask bit

# Extra bytes per managed entry in each phase of a step row; plain
# (unmanaged) entries always count ADAMW_BYTES. "exploit freeze" counts as
# "exploit", though it could in principle skip the traffic of masked-out entries.
PHASE_BYTES = {"dense": 0.0, "explore": SCORE_BYTES, "exploit": MASK_BYTES, "exploit freeze": MASK_BYTES}

# The copy bandwidth that "% copy" divides by counts a tensor copy as this
# many times its bytes (read + write; see timing.copy_bandwidth).
COPY_FACTOR = 2
COPY_RULE = f"{COPY_FACTOR} x bytes of a large tensor copy per second"


def step_bytes(managed, plain, phase):
    """The bytes model of one optimizer step over `managed` DPS entries and `plain` AdamW entries."""
    return managed * (ADAMW_BYTES + PHASE_BYTES[phase]) + plain * ADAMW_BYTES


def select_bytes(managed):
    """The bytes model of one stage boundary: the selection over `managed` entries."""
    return managed * SELECT_BYTES


def describe():
    """The model in one sentence, from the numbers above."""
    return (f"AdamW {ADAMW_BYTES:g} B per entry (read p, g, m, v; write p, m, v), explore +{SCORE_BYTES:g} B "
            f"(score read + write), exploit +{MASK_BYTES:g} B (packed mask bit) on managed entries; "
            f"selection {SELECT_BYTES:g} B per managed entry (read score, write mask bit)")
