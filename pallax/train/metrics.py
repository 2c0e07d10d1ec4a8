"""Model FLOPs, device peaks (for MFU), a JSONL log and a progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, SXM parts).
PEAK_TFLOPS = {
    "H100": 989.4,
    "H200": 989.4,
    "H800": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
}


def device_peak_tflops(device=None) -> float | None:
    """Peak bf16 TFLOP/s of ``device`` (default: the first one); None if unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in PEAK_TFLOPS.items():
        if name in kind.upper().replace("NVIDIA ", ""):
            return peak
    return None


def attended_keys(seq_len: int, left_window: int | None) -> float:
    """Mean keys per query under a causal mask with ``left_window`` earlier tokens."""
    if left_window is None or left_window + 1 >= seq_len:
        return (seq_len + 1) / 2
    w = left_window + 1  # a query sees min(position + 1, w) keys
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def training_flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward), counting
    every projection densely and only the attention scores inside the window —
    the usual MFU convention (no remat recomputation, no sparsity discount)."""
    d, e = config.dim_per_head, config.embed_dim
    h, kv = config.num_heads, config.num_kv_heads
    per_layer = e * h * d * 2 + e * kv * d * 2 + 3 * e * config.mlp_dim
    forward = 2 * (config.num_layers * per_layer + e * config.vocab_size)
    for layer in range(config.num_layers):
        forward += 4 * h * d * attended_keys(seq_len, config.left_window(layer))
    return 3.0 * forward


class JsonlLog:
    """Appends one JSON object per line; ``truncate_after(step)`` drops entries of
    steps a resumed run will redo, so the file always tells one consistent story."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class ProgressBar:
    """``[#####.....] 120/300 loss 2.31`` redrawn in place: ``\\r`` on a terminal,
    an updating display in Jupyter, nothing elsewhere (log lines suffice)."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30):
        self.total, self.width = total, width
        self.mode = None
        if enabled and _in_notebook():
            from IPython.display import display

            self.mode, self._handle = "notebook", display("", display_id=True)
        elif enabled and sys.stderr.isatty():
            self.mode = "terminal"

    def render(self, step: int, text: str = "") -> str:
        done = math.floor(self.width * step / max(self.total, 1))
        return f"[{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} {text}".rstrip()

    def update(self, step: int, text: str = "") -> None:
        if self.mode == "terminal":
            sys.stderr.write("\r\033[K" + self.render(step, text))
            sys.stderr.flush()
        elif self.mode == "notebook":
            self._handle.update(self.render(step, text))

    def clear_line(self) -> None:
        """Call before printing a log line so it does not land on the bar."""
        if self.mode == "terminal":
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.mode == "terminal":
            sys.stderr.write("\n")
