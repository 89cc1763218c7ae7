# %% [markdown]
# # lorasweep in a notebook
#
# Which LoRA rank should MiniLM-L6 use for Rotten Tomatoes sentiment? This runs a small sweep
# (3 ranks x 2 seeds) on the CPU, then looks at the trials, the statistics and the figures with
# the same objects the `lorasweep` command uses.
#
# Open it in Jupyter as a notebook (`jupytext --to notebook examples/notebook.py`, or VS Code's
# "Run cell" on the `# %%` markers), or run it as a script: `python examples/notebook.py`.
# The environment variables at the top let the test suite run it on a tiny model in seconds.

# %%
import os
from pathlib import Path

from lorasweep.api import Results, Sweep

MODEL = os.environ.get("LORASWEEP_EXAMPLE_MODEL", "builtin:minilm-l6")
DATA = os.environ.get("LORASWEEP_EXAMPLE_DATA", "builtin:rotten-tomatoes")
OUT = Path(os.environ.get("LORASWEEP_EXAMPLE_OUT", "runs/notebook"))
BACKEND = os.environ.get("LORASWEEP_EXAMPLE_BACKEND", "local")  # or "inprocess"
STEPS = int(os.environ.get("LORASWEEP_EXAMPLE_STEPS", "60"))

# %% [markdown]
# ## The spec: a dict here, or a YAML file (`Sweep.from_spec("sweep.yaml")`)
# Every key is described in docs/spec.md.

# %%
spec = {
    "name": "notebook",
    "task": "classification",
    "model": MODEL,
    "dataset": {
        "source": DATA,
        "max_train_examples": 1000,
        "max_eval_examples": 300,
        "max_length": 64,
    },
    "training": {"learning_rate": 2e-3, "per_device_train_batch_size": 32, "max_steps": STEPS},
    "lora": {"target_modules": ["query", "value"], "alpha": "2*rank", "dropout": 0.1},
    "grid": {"rank": [2, 8, 32]},
    "seeds": [0, 1],
}
sweep = Sweep.from_spec(spec)
sweep.plan()  # the trials it will run: variant x rank x seed, each with a stable id

# %% [markdown]
# ## Run it
# Resumable: run the cell again and finished trials are skipped. `backend="local"` gives each
# trial a fresh process (clean memory figures); `"inprocess"` starts faster.

# %%
results = sweep.run(OUT, backend=BACKEND, quiet=True)
results  # in Jupyter: a summary table and the recommendation

# %% [markdown]
# ## One row per trial

# %%
df = results.trials
df[["label", "status", "accuracy", "f1", "train_seconds", "trainable_params"]]

# %% [markdown]
# ## Statistics and the recommendation
# `analysis()` is `lorasweep.analysis.stats.analyze` (paired tests over seeds, Holm-adjusted);
# keyword arguments choose the metric, cost, margin or a memory budget. It is the dict `analyze`
# returns, shown as the comparison table, the recommendation card and the flags
# (`print(analysis)`: the text `lorasweep analyze` prints).

# %%
analysis = results.analysis()
analysis

# %%
summary = results.summary()  # the same table as a DataFrame, one row per configuration
summary

# %%
rec = results.recommendation  # .found, .key, .label, .metric, .mean, .std, .n, .margin, .reason
print(rec.found, rec.label, rec.key)
rec  # a card; print(rec) gives the paragraph

# %% [markdown]
# ## Figures (matplotlib Figures: shown inline, or `fig.savefig(...)`)
# A cell shows only its last value: one figure per cell, or several with `results.plots(...)`.

# %%
fig = results.plot_metric()
fig

# %%
results.plot_time()

# %%
figs = results.plots("loss_curves", "pareto")  # shown together, one under the other
figs

# %% [markdown]
# ## The HTML report, and results read back later without training

# %%
report = results.report()
again = Results(OUT)
assert len(again.trials) == len(df)
if __name__ == "__main__":  # as a script: print and save what a notebook would show
    print(df[["label", "status", "accuracy", "train_seconds"]].to_string(index=False))
    print(analysis)
    fig.savefig(OUT / "metric_vs_rank_notebook.png")
    figs.save(OUT, prefix="notebook_")
    print(f"Report: {report}")
