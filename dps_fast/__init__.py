"""dps_fast: DPS (Dynamic Parameter Selection) fine-tuning as a torch optimizer."""
from .optimizer import DPSAdamW
from .groups import param_groups

__all__ = ["DPSAdamW", "param_groups"]
__version__ = "0.1.0"
