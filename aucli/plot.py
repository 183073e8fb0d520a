"""``aucli plot``: a timeline figure of one face track's AUs from a detect table.

One lane per AU: its probability over time (a line; with a min-max band where
many frames share one drawn column), its decisions as shaded spans, and frames
without this face as hatched gaps; a side panel gives each AU's share of active
frames. The figure is drawn with matplotlib's Agg (and its SVG/PDF) renderers
directly, never through pyplot, so it needs no display and leaves any pyplot
state of the caller alone.

Long videos are binned into at most ``MAX_COLUMNS`` columns of equal duration
for drawing only: the shares, the shading (share of a column's frames active)
and the min-max band are computed from every frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .aus import FACS_NAMES
from .errors import AucliError, UsageError
from .writers import atomic_output, read_table

FORMATS = ("png", "svg", "pdf")
MAX_COLUMNS = 1200  # about the drawn width of the time axis in pixels at the default size
NO_FACE = -1  # face_id of rows of frames without any face (detect --faces all)

LINE = "#1f4e79"  # probability
ACTIVE = (0.95, 0.55, 0.10, 0.40)  # decision spans (RGBA)
GAP = "#e3e3e3"  # no face
GAP_HATCH = "#b5b5b5"
SHARE = "#d9822b"
FACE = "#4a7c59"
FACE_PARTLY = "#a9c8b0"
LANE_INCHES = 0.42  # height of one AU's lane: 17 AUs fit a page


@dataclass
class Timeline:
    """One face track on the video's time axis, in drawing columns (frames, or bins of frames)."""

    face_id: int
    labels: list[str]  # AU01, AU02, ... in table order
    names: list[str]  # FACS names ("" where unknown)
    edges: np.ndarray  # (C + 1,) column edges, seconds
    prob: np.ndarray  # (C, N) mean probability in the column; NaN where the face is absent
    low: np.ndarray  # (C, N) smallest probability in the column
    high: np.ndarray  # (C, N) largest
    active: np.ndarray  # (C, N) share of the column's face frames with the AU on; NaN without a face
    gap: np.ndarray  # (C,) True where no frame of the column has this face
    present: np.ndarray  # (C,) share of the column's frames with this face
    share: np.ndarray  # (N,) share of this face's frames with the AU on, over every frame
    frames: int  # frames of the video
    face_frames: int  # frames with this face
    binned: bool  # columns hold several frames
    thresholds: list[float] | None  # per AU, when the table says (JSON output)
    title: str


def au_labels(table: pd.DataFrame) -> list[str]:
    """AU labels of a detect table, in its column order (AU01 for AU01_p)."""
    return [c[:-2] for c in table.columns if c.startswith("AU") and c.endswith("_p")]


def au_name(label: str, names: dict[str, str] | None = None) -> str:
    """FACS name in lower case ("lip corner puller"), or "" when aucli does not know it."""
    number = int(label[2:]) if label[2:].isdigit() else None
    name = FACS_NAMES.get(number) or (names or {}).get(label, "")
    return name[:1].lower() + name[1:]


def face_ids(table: pd.DataFrame) -> list[int]:
    """Face tracks with at least one detected frame (0 alone when there is none)."""
    ids = sorted(int(i) for i in table.loc[table["success"] == 1, "face_id"].unique() if i != NO_FACE)
    return ids or [0]


def timeline(table: pd.DataFrame, face_id: int = 0, max_columns: int = MAX_COLUMNS, title: str = "") -> Timeline:
    """The arrays one figure draws, for one face track of a detect table."""
    labels = au_labels(table)
    if not labels or not {"frame", "timestamp", "face_id", "success"} <= set(table.columns):
        raise AucliError("not an aucli detect table (needs frame, timestamp, face_id, success and AUxx_p columns)")
    if table.empty:
        raise AucliError("the table has no rows")
    frames = table.groupby("frame", sort=True)["timestamp"].first()  # every frame of the video, once
    times = frames.to_numpy(float)
    mine = table[(table["face_id"] == face_id) & (table["success"] == 1)].drop_duplicates("frame")
    position = pd.Series(np.arange(len(frames)), index=frames.index)[mine["frame"]].to_numpy()
    prob = np.full((len(frames), len(labels)), np.nan)
    on = np.full_like(prob, np.nan)
    prob[position] = mine[[f"{au}_p" for au in labels]].to_numpy(float, na_value=np.nan)
    has_face = np.zeros(len(frames), bool)
    has_face[position] = True
    decided = [f"{au}_c" for au in labels]
    on[position] = mine[decided].to_numpy(float, na_value=np.nan) if set(decided) <= set(table.columns) else np.nan

    step = float(np.median(np.diff(times))) if len(times) > 1 else 1 / 30
    frame_edges = np.append(times, times[-1] + max(step, 1e-3))
    if len(times) <= max_columns:
        edges, mean, low, high, active, binned = frame_edges, prob, prob, prob, on, False
        present = has_face.astype(float)
    else:  # equal-duration bins; statistics over the frames in each
        edges = np.linspace(frame_edges[0], frame_edges[-1], max_columns + 1)
        column = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, max_columns - 1)
        groups = pd.DataFrame(prob).groupby(column)
        every = pd.RangeIndex(max_columns)
        mean, low, high = (getattr(groups, f)().reindex(every).to_numpy() for f in ("mean", "min", "max"))
        active = pd.DataFrame(on).groupby(column).mean().reindex(every).to_numpy()
        present = pd.Series(has_face).groupby(column).mean().reindex(every, fill_value=0.0).to_numpy()
        binned = True
    attrs = table.attrs or {}
    model = attrs.get("model", {})
    given = dict(zip(model.get("aus", []), model.get("au_names", [])))
    thresholds = model.get("thresholds")
    with np.errstate(invalid="ignore"):
        share = np.nanmean(on, axis=0) if len(mine) else np.full(len(labels), np.nan)
    return Timeline(
        face_id=face_id, labels=labels, names=[au_name(au, given) for au in labels], edges=edges,
        prob=mean, low=low, high=high, active=active, gap=present == 0, present=present, share=share,
        frames=len(times), face_frames=len(mine), binned=binned,
        thresholds=list(thresholds) if thresholds and len(thresholds) == len(labels) else None,
        title=title,
    )


def draw(line: Timeline, width: float = 12.0, dpi: int = 120):
    """A matplotlib Figure of one timeline (not attached to pyplot)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    count = len(line.labels)
    height = 1.6 + LANE_INCHES * (count + 0.4)
    fig = Figure(figsize=(width, height), dpi=dpi)
    grid = fig.add_gridspec(count + 1, 2, width_ratios=[7, 1], height_ratios=[0.4] + [1] * count, hspace=0.12,
                            wspace=0.03, left=0.2, right=0.975, top=1 - 0.95 / height, bottom=0.55 / height)
    duration = float(line.edges[-1] - line.edges[0])
    strip = fig.add_subplot(grid[0, 0])
    _face_strip(strip, line)
    lanes = [fig.add_subplot(grid[j + 1, 0], sharex=strip) for j in range(count)]
    for j, ax in enumerate(lanes):
        _lane(ax, line, j)
        _share(fig.add_subplot(grid[j + 1, 1]), line.share[j], title="active" if j == 0 else None)
    bottom = lanes[-1] if lanes else strip
    bottom.tick_params(axis="x", labelbottom=True, length=3, labelsize=8)
    step = _tick_step(duration)
    bottom.xaxis.set_major_locator(MultipleLocator(step))
    long = duration >= 120
    bottom.xaxis.set_major_formatter(
        FuncFormatter(lambda s, _: f"{int(s // 60)}:{int(round(s % 60)):02d}" if long else f"{s:g}"))
    bottom.set_xlabel("time (min:s)" if long else "time (s)", fontsize=9)

    title = line.title or "AU timeline"
    present = line.face_frames / line.frames if line.frames else 0.0
    fig.suptitle(f"{title} — face {line.face_id}: in {line.face_frames} of {line.frames} frames "
                 f"({present:.0%}), {duration:.1f} s", x=0.02, y=1 - 0.25 / height, ha="left", fontsize=11)
    handles = [Line2D([], [], color=LINE, linewidth=1.2, label="probability (0–1 per lane)"),
               Patch(facecolor=ACTIVE, label="active (decision)"),
               Patch(facecolor=GAP, edgecolor=GAP_HATCH, hatch="////", label="no face")]
    if line.binned:
        handles.insert(1, Patch(facecolor=LINE, alpha=0.2, label="min–max in column"))
    if line.thresholds:
        handles.append(Line2D([], [], color=LINE, linewidth=0.6, linestyle=(0, (3, 3)), label="threshold"))
    fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(0.975, 1 - 0.45 / height), ncol=len(handles),
               fontsize=8, frameon=False)
    return fig


def _face_strip(ax, line: Timeline) -> None:
    """A thin strip above the lanes: dark where every frame of a column has this face,
    lighter where some do, hatched where none does (gaps shorter than a column show here)."""
    from matplotlib.colors import LinearSegmentedColormap

    # Any missing frame makes a column clearly lighter, so a short gap is not lost in binning.
    cmap = LinearSegmentedColormap.from_list("aucli_face", [(0, GAP), (0.999, FACE_PARTLY), (1, FACE)])
    _hatch_gaps(ax, line)
    present = np.ma.masked_where(line.present == 0, line.present)
    ax.pcolormesh(line.edges, [0, 1], present[None, :], cmap=cmap, vmin=0, vmax=1, shading="flat",
                  rasterized=True)
    _tidy(ax, "face", "")


def _lane(ax, line: Timeline, j: int) -> None:
    """One AU: gaps, decision spans, the probability line (and band), the threshold."""
    x = (line.edges[:-1] + line.edges[1:]) / 2
    _hatch_gaps(ax, line)
    shade = np.nan_to_num(line.active[:, j])
    ax.pcolormesh(line.edges, [0, 1], shade[None, :], cmap=_active_cmap(), vmin=0, vmax=1, shading="flat",
                  rasterized=True)
    if line.binned:
        ax.fill_between(x, line.low[:, j], line.high[:, j], color=LINE, alpha=0.2, linewidth=0)
    ax.plot(x, line.prob[:, j], color=LINE, linewidth=0.9)
    alone = _isolated(line.prob[:, j])
    if alone.any():  # one-column runs between gaps draw no line: mark them
        ax.plot(x[alone], line.prob[alone, j], ".", color=LINE, markersize=2.5)
    if line.thresholds:
        ax.axhline(line.thresholds[j], color=LINE, linewidth=0.6, linestyle=(0, (3, 3)), alpha=0.6)
    _tidy(ax, line.labels[j], line.names[j])


def _hatch_gaps(ax, line: Timeline) -> None:
    gap = np.append(line.gap, line.gap[-1])  # step="post" reads one value per edge
    ax.fill_between(line.edges, 0, 1, where=gap, step="post", facecolor=GAP, edgecolor=GAP_HATCH,
                    hatch="////", linewidth=0)


def _tidy(ax, label: str, name: str) -> None:
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.tick_params(axis="x", labelbottom=False, length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_color("#999999")
    ax.annotate(label, (0, 0.5), xycoords="axes fraction", xytext=(-4, 0), textcoords="offset points",
                ha="right", va="center", fontsize=9, weight="bold")
    ax.annotate(name, (0, 0.5), xycoords="axes fraction", xytext=(-38, 0), textcoords="offset points",
                ha="right", va="center", fontsize=8, color="#444444")


def _share(ax, value: float, title: str | None) -> None:
    """The side panel's bar: share of this face's frames with the AU active."""
    if np.isfinite(value):
        ax.barh(0.5, value, height=0.6, color=SHARE)
    ax.text(1.5, 0.5, f"{value:.0%}" if np.isfinite(value) else "–", ha="right", va="center", fontsize=8)
    ax.set_xlim(0, 1.5)  # the bar's full length is 1; the text sits to its right
    ax.set_ylim(0, 1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8, loc="left", pad=2)


def _tick_step(duration: float) -> float:
    """A round tick spacing (seconds) giving about 6-12 ticks."""
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if duration / step <= 12:
            return step
    return 3600 * np.ceil(duration / 12 / 3600)


def plot_table(
    source: str | Path | pd.DataFrame,
    output: str | Path | None = None,
    face_id: int | None = None,
) -> list[Path]:
    """Draw a detect table (CSV, JSON or the DataFrame) -> the image files written.

    One figure per face track: ``output`` itself for one track (or with ``face_id``),
    ``<stem>_face<id><ext>`` for each of several. The extension picks the format
    (png, svg, pdf); default: the input's name with .png.
    """
    if isinstance(source, pd.DataFrame):
        table, default = source, Path("aus.png")
    else:
        path = Path(source)
        if not path.is_file():
            raise AucliError(f"{path}: no such file")
        try:
            table = read_table(path)
        except (ValueError, KeyError, OSError, UnicodeDecodeError) as error:
            raise AucliError(f"{path}: not a readable detect table ({str(error).splitlines()[0]})") from None
        default = path.with_suffix(".png")
    output = Path(output) if output is not None else default
    kind = output.suffix.lower().lstrip(".")
    if kind not in FORMATS:
        raise UsageError(f"-o {output}: the extension picks the format; expected .png, .svg or .pdf")
    if not output.parent.is_dir():
        raise AucliError(f"cannot write {output}: folder {output.parent} does not exist")
    known = face_ids(table) if {"face_id", "success"} <= set(table.columns) else [0]
    if face_id is not None and face_id not in known:
        raise UsageError(f"--face-id {face_id}: the table has face(s) {', '.join(map(str, known))}")
    chosen = [face_id] if face_id is not None else known
    targets = [output] if len(chosen) == 1 else [
        output.with_name(f"{output.stem}_face{i}{output.suffix}") for i in chosen]
    video = (table.attrs or {}).get("video", {}).get("path")  # JSON tables name their video
    title = Path(video).name if video else (Path(source).name if not isinstance(source, pd.DataFrame) else "")
    for i, target in zip(chosen, targets):
        _save(draw(timeline(table, i, title=title)), target, kind)
    return targets


def _save(fig, path: Path, kind: str) -> None:
    """Write atomically, like the tables."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg for PNG; savefig picks the SVG and PDF renderers by format
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=kind, metadata=_metadata(kind))


def _metadata(kind: str) -> dict:
    # Leave dates out, so the same table gives the same file.
    return {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[kind]


def _active_cmap():
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("aucli_active", [(*ACTIVE[:3], 0.0), ACTIVE])


def _isolated(values: np.ndarray) -> np.ndarray:
    ok = np.isfinite(values)
    before = np.r_[False, ok[:-1]]
    after = np.r_[ok[1:], False]
    return ok & ~before & ~after
