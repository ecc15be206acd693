"""`dps-fast finetune`: fine-tune the bundled all-MiniLM-L6-v2 on MR or TREC-6
with AdamW, DPS (Dense, Mix) and the paper's baselines (ChildTuning-F/-D,
Mixout), several seeds each, and report dev accuracy over seeds: mean ± std,
min, degenerate runs, paired differences against AdamW, dev accuracy over
training, and for MR out-of-domain accuracy on other sentiment domains.

Offline: the model and the data come from PyPI packages (dps_fast.data).
The recipe is the paper's, scaled to a small model: one learning rate for
every method (5e-5 by default; the paper's 2e-5 is for BERT-large), batch
16, linear warmup over 10% of the steps then linear decay, weight decay
0.01, dropout 0 (the paper's choice for runs under 2000 steps), clipping at
norm 1 in each method's published order (dps_fast.baselines), 3 epochs;
DPS sparsity 0.3 and stage length T = int(0.05 * steps); ChildTuning q = 0.3;
Mixout p = 0.3. Each seed sets the classifier initialisation, the batch
order and the random draws of DPS-Mix, Mixout and ChildTuning-F; the
training subset and the dev set are fixed (dps_fast.data).

Modules, by job: recipe (one run), study (many runs), report (tables and
statistics), plot (the --plot figure), cli (options, checks, the command).
"""
from .cli import add_arguments, run
from .plot import plot
from .recipe import Encoded, Recipe, evaluate, load_model, train_run
from .report import format_curves, format_paired, format_table, paired, summarize
from .study import run_study

__all__ = ["Encoded", "Recipe", "add_arguments", "evaluate", "format_curves", "format_paired", "format_table",
           "load_model", "paired", "plot", "run", "run_study", "summarize", "train_run"]
