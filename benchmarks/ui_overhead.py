"""What the web app adds to a generation: the same call through `persres ui` (gradio_client, the
app on loopback) and through `persres.Workspace` directly, same prompt, seeds and toy model.

    OMP_NUM_THREADS=1 python -m benchmarks.ui_overhead --json benchmarks/results/cpu-ui_overhead.json

The first request after start (the pipeline loads then) is timed on its own; then the two
paths alternate, `--repeats` times each, and the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)  # the page's default
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="persres-ui-bench-"))
    os.environ["PERSRES_HOME"] = str(home / "home")
    from gradio_client import Client

    from persres.ui.app import serve
    from persres.workspace import Workspace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = Workspace()  # the toy model
    ws.train("toy:checker_circle", "checker", "circle", steps=60)
    ws.release()  # the app's first request loads the pipeline, as after a fresh start
    app, url = serve(ws, home / "out", port=port, block=False)
    client = Client(url, verbose=False, download_files=False)  # the page shows them; the benchmark need not fetch them
    request = ("a <checker> circle on a green background", [], True, args.steps, 6.0, 0, args.count, "", [])

    t0 = time.perf_counter()
    client.predict(*request, api_name="/generate")
    first = time.perf_counter() - t0
    through_app, direct = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        client.predict(*request, api_name="/generate")
        through_app.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ws.generate(request[0], [], lag=True, steps=args.steps, seed=0, num_images=args.count, save_masks=True, out_dir=home / "direct")
        direct.append(time.perf_counter() - t0)
    app.close()
    result = {"first_request_s": round(first, 3), "app_s": [round(t, 3) for t in through_app], "api_s": [round(t, 3) for t in direct],
              "app_over_api": round(statistics.median(through_app) / statistics.median(direct), 4),
              "steps": args.steps, "images": args.count, "repeats": args.repeats, "threads": os.environ.get("OMP_NUM_THREADS")}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
