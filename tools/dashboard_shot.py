"""The dashboards a user opens, checked in a real browser: a short plain training loop logs to JSONL, wandb (offline)
and TensorBoard; TensorBoard serves the logs; headless Chromium renders its Custom Scalars tab to a PNG.

    python tools/dashboard_shot.py OUT_DIR [--png docs/img/tensorboard_custom_scalars.png]

tests/test_dashboards.py runs the same functions; the committed screenshot in docs/ comes from this script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from instrumented_adamw import InstrumentedAdamW  # noqa: E402
from instrumented_adamw.monitor import ForceMonitor  # noqa: E402
from instrumented_adamw.sinks import JsonlSink, TensorBoardSink, WandbSink  # noqa: E402

STEPS, LOG_EVERY, WEIBULL_EVERY = 60, 5, 20


def tiny_gpt_neox(seed: int = 0):
    """A 2-layer GPT-NeoX with Pythia's naming, randomly initialised (no download)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, rotary_pct=0.25)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


def plain_loop(out: Path, steps: int = STEPS) -> dict:
    """``steps`` steps of a plain loop with every sink; returns where each sink wrote."""
    os.environ.setdefault("WANDB_SILENT", "true")
    model = tiny_gpt_neox()
    opt = InstrumentedAdamW(model.named_parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    sinks = [JsonlSink(out / "jsonl"), WandbSink("dashboards", directory=out, mode="offline"),
             TensorBoardSink(out / "tensorboard")]  # fmt: skip
    monitor = ForceMonitor(opt, model, sinks, log_every=LOG_EVERY, weibull_every=WEIBULL_EVERY, total_steps=steps,
                           lr_at=lambda s: min(1.0, s / 10))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        ids = torch.randint(0, 96, (4, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        monitor.step(step, loss=float(loss.detach()), lr=sched.get_last_lr()[0])
    monitor.close()
    return {"jsonl": out / "jsonl", "wandb": out / "wandb", "tensorboard": out / "tensorboard"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tensorboard(logdir: Path, timeout: float = 60.0):
    """A TensorBoard server on ``logdir`` (its own process, a free local port); yields its URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port",
           str(port), "--reload_interval", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"TensorBoard did not start: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(url: str, png: Path, size: tuple[int, int] = (1400, 1900), wait_ms: int = 20000) -> Path:
    """Headless Chromium renders ``url`` (its scripts run for ``wait_ms`` of virtual time) into ``png``."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("no Chromium on PATH: apt-get install chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size[0]},"
           f"{size[1]}", f"--virtual-time-budget={wait_ms}", f"--screenshot={png}", url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "tensorboard_custom_scalars.png")
    args = parser.parse_args()
    where = plain_loop(args.out)
    with tensorboard(where["tensorboard"]) as url:
        print(screenshot(f"{url}/?darkMode=false#custom_scalars", args.png))


if __name__ == "__main__":
    main()
