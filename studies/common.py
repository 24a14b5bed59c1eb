"""Helpers shared by the studies: LaTeX tables, figure saving, number formatting, sampled store rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from crosslayer.io import atomic_path, write_text

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text) -> str:
    """``text`` with LaTeX's special characters escaped (and non-printing characters made visible)."""
    text = str(text).replace("\n", "\\n").replace("\t", "\\t")
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return "".join(ch if ch.isprintable() and ord(ch) < 0x2000 else "?" for ch in out)


def token_tex(token: str) -> str:
    """A token for a LaTeX table: monospaced, leading/trailing spaces shown as a visible space."""
    body = latex_escape(token).replace(" ", r"\textvisiblespace{}")
    return rf"\texttt{{{body}}}"


def fmt(value, digits: int = 3) -> str:
    """A number for the paper: ints with separators, floats to ``digits`` significant places."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "--"
    if isinstance(value, (int,)) or (isinstance(value, float) and value.is_integer() and abs(value) >= 100):
        return f"{int(value):,}"
    if isinstance(value, float):
        text = f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return f"{value:,.0f}" if "e+" in text else text  # 100, not 1e+02 (more integer digits than ``digits``)
    return latex_escape(value)


def latex_table(frame: pd.DataFrame, path: str | Path, *, caption: str, label: str,
                columns: dict[str, str] | None = None, digits: int = 3, raw_columns: tuple = ()) -> Path:
    """Write ``frame`` as a booktabs ``table`` environment to ``path`` (atomically).

    ``columns`` maps column names to headers (and selects/orders them); cells are formatted with
    :func:`fmt` except those in ``raw_columns``, which are written as given (already LaTeX).
    """
    columns = columns or {c: c for c in frame.columns}
    frame = frame[list(columns)]
    align = "".join("r" if pd.api.types.is_numeric_dtype(frame[c]) else "l" for c in columns)
    head = " & ".join(latex_escape(h) if h not in raw_columns else h for h in columns.values())
    body = []
    for _, row in frame.iterrows():
        cells = [str(row[c]) if c in raw_columns else fmt(row[c], digits) for c in columns]
        body.append(" & ".join(cells) + r" \\")
    text = (f"% generated from CSV results; do not edit\n\\begin{{table}}[tbp]\n\\centering\\small\n"
            f"\\caption{{{caption}}}\n\\label{{{label}}}\n"
            f"\\resizebox{{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}}{{!}}{{%\n"
            f"\\begin{{tabular}}{{{align}}}\n\\toprule\n{head} \\\\\n\\midrule\n" + "\n".join(body)
            + "\n\\bottomrule\n\\end{tabular}}\n\\end{table}\n")
    path = Path(path)
    write_text(text, path)
    return path


def theme() -> None:
    """The seaborn style of every figure."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def save_figure(fig, path: str | Path, *, dpi: int = 150) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def read_csv(results: str | Path, name: str) -> pd.DataFrame:
    """``results/name.csv`` with a clear error if the study has not produced it."""
    from crosslayer.errors import CrosslayerError

    path = Path(results) / f"{name}.csv"
    if not path.is_file():
        raise CrosslayerError(f"{path} is missing; run the study first (crosslayer study ...)")
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


# ----------------------------------------------------------------------------- rows of a store

def sample_rows(store, n: int, *, seed: int = 0) -> np.ndarray:
    """``min(n, rows)`` distinct row indices of ``store``, sorted, from a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(store.n_rows, generator=gen)[:min(n, store.n_rows)]
    return np.sort(rows.numpy())


@torch.no_grad()
def encode_rows(dictionary, store, rows: np.ndarray, *, batch_size: int = 1024) -> Tensor:
    """Feature activations ``[N, F]`` of ``store`` rows ``rows`` (raw rows, the dictionary's own factors)."""
    from crosslayer.dictionary import check_compatible

    check_compatible(dictionary, store)
    parts = [dictionary.encode(store.get(rows[s:s + batch_size], layers=dictionary.layers), normalized=False).float()
             for s in range(0, len(rows), batch_size)]
    return torch.cat(parts)


def column_corr(a_NF: Tensor, b_NF: Tensor) -> Tensor:
    """Pearson correlation of each column of ``a`` with the same column of ``b`` ``[F]`` (NaN if constant)."""
    a = a_NF.double() - a_NF.double().mean(0)
    b = b_NF.double() - b_NF.double().mean(0)
    den = (a.pow(2).sum(0) * b.pow(2).sum(0)).sqrt()
    return torch.where(den > 0, (a * b).sum(0) / den.clamp_min(1e-300), torch.full_like(den, float("nan"))).float()


def bootstrap_mean(values_PM: np.ndarray, *, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over the rows (prompts, features, ...: the resampled unit) of each column of ``values_PM`` and its 95 %
    percentile-bootstrap interval (``n_boot`` resamples of the P rows with replacement, the same draws for every
    column; NaN without rows)."""
    from crosslayer.evals import bootstrap_counts

    values_PM = np.asarray(values_PM, dtype=np.float64)
    if len(values_PM) == 0:
        nan_M = np.full(values_PM.shape[1], np.nan)
        return nan_M, nan_M, nan_M
    means_BM = bootstrap_counts(len(values_PM), n_boot, seed) @ values_PM / len(values_PM)
    lo_M, hi_M = np.quantile(means_BM, [0.025, 0.975], axis=0)
    return values_PM.mean(0), lo_M, hi_M
