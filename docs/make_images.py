"""Make the README's pictures: a timeline plot and one frame of the annotated video.

    python docs/make_images.py [--checkpoint PATH] [--video PATH] [--frame N] [--device cpu]

Runs ``aucli detect`` on a sample video (the checkpoint is found as detect finds
it: --checkpoint, $AUCLI_CHECKPOINT, the one .pt in ./weights/, else the shipped
starter), then writes into docs/images/:

    timeline.png        aucli plot of the table
    overlay_frame.png   one frame of the --overlay video (default: the frame
                        with the most active AUs, ties broken by the larger
                        probability sum), decoded from the encoded file
    <video stem>.csv    the table both were made from
    made_with.json      the checkpoint (path, SHA-256, AU set, provenance),
                        the video, the frame and the aucli version
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import cv2  # noqa: E402

import aucli  # noqa: E402
from aucli.plot import plot_table  # noqa: E402
from aucli.writers import get_writer  # noqa: E402

OUT = ROOT / "docs" / "images"


def pick_frame(table) -> int:
    """0-based index of the frame with the most active AUs (then the largest probability sum)."""
    found = table[table["success"] == 1]
    if found.empty:
        return 0
    active = found.filter(like="_c").sum(axis=1).astype(float)
    total = found.filter(like="_p").sum(axis=1)
    best = (active * 1000 + total).idxmax()
    return int(found.loc[best, "frame"]) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: as aucli detect finds one")
    parser.add_argument("--video", type=Path, default=ROOT / "sample_videos" / "videos" / "WolfgangLanger_Pexels.mp4")
    parser.add_argument("--frame", type=int, help="0-based frame of the overlay picture")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        overlay = Path(scratch) / "annotated.mp4"
        table = aucli.detect(str(args.video), args.checkpoint, device=args.device, overlay=overlay)
        csv = OUT / f"{args.video.stem}.csv"
        get_writer("csv").write(table, csv)
        plot_table(table, OUT / "timeline.png")  # the table itself: its metadata names the video
        frame = pick_frame(table) if args.frame is None else args.frame
        with av.open(str(overlay)) as container:
            picture = next(f for i, f in enumerate(container.decode(video=0)) if i == frame)
            cv2.imwrite(str(OUT / "overlay_frame.png"), picture.to_ndarray(format="bgr24"))
    model = table.attrs["model"]
    made_with = {
        "aucli_version": table.attrs["aucli_version"],
        "checkpoint": {k: model[k] for k in ("checkpoint", "sha256", "au_set", "backbone", "source")},
        "video": str(args.video.relative_to(ROOT) if args.video.is_relative_to(ROOT) else args.video),
        "overlay_frame": {"index": frame, "csv_frame": frame + 1},
        "command": "python docs/make_images.py" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else ""),
    }
    (OUT / "made_with.json").write_text(json.dumps(made_with, indent=2) + "\n")
    row = table[table["frame"] == frame + 1].iloc[0]
    print(f"wrote {OUT}/timeline.png, overlay_frame.png (frame {frame + 1} of the CSV: "
          f"{int(row.filter(like='_c').sum())} AUs active), {csv.name}, made_with.json; "
          f"checkpoint {model['checkpoint']} ({model['source'].get('kind', '?')})")


if __name__ == "__main__":
    main()
