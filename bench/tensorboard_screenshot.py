"""A screenshot of TensorBoard as a person sees it: a real TensorBoard server on a log folder, a headless Chromium
browser on its Time Series page with a tag filter, the page saved as a PNG.

    python bench/tensorboard_screenshot.py outputs/synthetic --filter "caption/direction|fvd/synthetic-12$" \
        --out docs/tensorboard_caption_accuracy.png

Charts are drawn by WebGL in software (SwiftShader). Needs a Chromium (``--chromium``, default the first of chromium, chromium-browser, google-chrome on the PATH;
on Debian ``apt-get install chromium``); the project does not install one, so no test depends on it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from common import free_port


def wait_for(url: str, seconds: float) -> None:
    """Until ``url`` answers, or a clear error after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"TensorBoard did not answer at {url} within {seconds:.0f} s")
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--filter", default="caption/|fvd/", help="TensorBoard's tag filter (a regex)")
    parser.add_argument("--runs", default=None, help="TensorBoard's run filter (a regex)")
    parser.add_argument("--out", type=Path, default=Path("docs/tensorboard_caption_accuracy.png"))
    parser.add_argument("--size", default="1600,1000", help="window width,height in pixels")
    parser.add_argument("--wait-ms", type=int, default=40000, help="virtual time the page gets to load its charts")
    parser.add_argument("--chromium", default=None)
    args = parser.parse_args(argv)
    if not args.logdir.is_dir():
        parser.error(f"logdir {str(args.logdir)!r} is not a folder")
    browser = args.chromium or next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                                     if shutil.which(b)), None)
    if browser is None:
        parser.error("no Chromium found; expected --chromium PATH or chromium on the PATH (apt-get install chromium)")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir),
                               "--port", str(port), "--host", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/data/runs", 60)
        wait_for(f"{base}/data/plugin/scalars/tags", 60)  # the event files are read before the page asks for them
        query = {"darkMode": "false", "tagFilter": args.filter}
        if args.runs:
            query["runFilter"] = args.runs
        url = f"{base}/?{urllib.parse.urlencode(query)}#timeseries"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # Twice: the first visit makes TensorBoard load every run's events, so the second one's charts have data by
        # the time the page is drawn (a cold server leaves empty cards).
        for _ in range(2):
            subprocess.run([browser, "--headless", "--no-sandbox", "--use-gl=swiftshader", "--hide-scrollbars",
                            "--run-all-compositor-stages-before-draw", f"--window-size={args.size}",
                            f"--virtual-time-budget={args.wait_ms}", f"--screenshot={args.out.resolve()}", url],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=240)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out} ({url})")
    return args.out


if __name__ == "__main__":
    main()
