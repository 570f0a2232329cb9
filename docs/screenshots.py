"""Take the README screenshots: TensorBoard (Scalars, Custom Scalars, Images) and the MLflow run
page, from real servers on the output of `make demo`, with headless Chromium.

    make demo && .venv/bin/python docs/screenshots.py [--workdir .] [--out docs/images]

Needs Debian's chromium (apt-get install chromium). Starts `tensorboard` and `mlflow server` on
free loopback ports and stops them afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import servers  # noqa: E402  (the test suite's real-server helpers)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def shoot(url: str, out: Path, size: str = "1400,1000", wait_ms: int = 15000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)
    print("wrote", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT, help="where `make demo` wrote runs/ and mlflow.db (the checkout)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.workdir.resolve()

    tb = servers.tensorboard_server(work / "runs", Path(tempfile.mkdtemp()) / "tb.log")
    try:
        shoot(f"{tb.url}/#scalars&_smoothingWeight=0&tagFilter=digit%20%5B08%5D%2Fmean%7C_summary%2Fmacro", args.out / "tensorboard_scalars.png")
        shoot(f"{tb.url}/#custom_scalars", args.out / "tensorboard_custom_scalars.png")
        shoot(f"{tb.url}/#images", args.out / "tensorboard_images.png", size="1400,1300")
    finally:
        tb.stop()

    port = servers.free_port()
    ui = servers.ServerProcess(
        [str(servers.BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        "/health", port, Path(tempfile.mkdtemp()) / "mlflow.log",
        env={"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    ).start()
    try:
        req = urllib.request.Request(f"{ui.url}/api/2.0/mlflow/experiments/search",
                                     data=json.dumps({"max_results": 50}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            exp_ids = [e["experiment_id"] for e in json.load(r)["experiments"]]
        req = urllib.request.Request(f"{ui.url}/api/2.0/mlflow/runs/search",
                                     data=json.dumps({"experiment_ids": exp_ids, "max_results": 1}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            run = json.load(r)["runs"][0]["info"]
        base = f"{ui.url}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
        shoot(base, args.out / "mlflow_run.png", size="1400,1100", wait_ms=20000)
        shoot(f"{base}/model-metrics", args.out / "mlflow_metrics.png", size="1400,1300", wait_ms=25000)
    finally:
        ui.stop()


if __name__ == "__main__":
    main()
