"""Thousands of cached rows under a soft limit of 256 descriptors.

Every packed state and every RAM row is a slot of the runtime's shared-memory arena
(`erllama_py.model.arena`), so the descriptors the runtime and its workers hold do not
grow with the rows. The run happens in a child interpreter whose soft ``RLIMIT_NOFILE``
is 256 (its workers inherit it): with one memfd per row, as before, it would fail after
about a hundred rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROWS = 3000
SCRIPT = r"""
import json, os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
import erllama_py

root, rows = sys.argv[1], int(sys.argv[2])
rt = erllama_py.start({
    "cache": {"tiers": [{"kind": "ram", "quota_mb": 256}]},
    "policy": {"min_tokens": 4, "cold_min_tokens": 4, "boundary_trim_tokens": 0,
               "boundary_align_tokens": 1},
    "daemon": {"log_file": os.path.join(root, "log", "erllama-py.log"),
               "pid_file": os.path.join(root, "pid"),
               "control_socket": os.path.join(root, "control.sock")},
})
try:
    rt.load_model("m", backend="stub", n_ctx=64, n_batch=32, n_seq_max=2,
                  stub={"n_vocab": 256})
    fds_peak = 0
    for i in range(rows):
        # A prompt of its own per request (token ids, so none repeats): one cold save each.
        prompt = [1, 2 + i % 250, 2 + (i // 250) % 250, 2 + i // 62500, 7, 8]
        rt.complete("m", prompt, max_tokens=1)
        if i % 100 == 0:
            fds_peak = max(fds_peak, len(os.listdir("/proc/self/fd")))
    rt.cache.wait_idle()
    worker = rt.model_info("m").worker.pid
    counters = rt.counters()
    print(json.dumps({
        "ram_rows": sum(1 for r in rt.cache_rows() if r.tier == "ram"),
        "fds": len(os.listdir("/proc/self/fd")),
        "fds_peak": fds_peak,
        "worker_fds": len(os.listdir(f"/proc/{worker}/fd")),
        "saves_dropped": counters.saves_dropped,
        "save_bytes_copied": counters.save_bytes_copied,
        "requests": rt.model_info("m").requests_done,
    }))
finally:
    rt.stop()
"""


def test_thousands_of_ram_rows_fit_under_a_soft_limit_of_256_descriptors(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(ROWS)],
        capture_output=True,
        text=True,
        timeout=600,  # generous: a wedged child must fail the test, not hang the suite
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["requests"] == ROWS
    assert out["ram_rows"] >= ROWS  # every prompt's cold save is a RAM row
    assert out["saves_dropped"] == 0
    assert out["save_bytes_copied"] == 0  # still zero-copy
    assert out["fds_peak"] < 256 and out["fds"] < 256
    assert out["worker_fds"] < 64
