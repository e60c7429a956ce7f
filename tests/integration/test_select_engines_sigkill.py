"""Resuming the greedy after the process is killed: a subprocess selects with checkpoints and
SIGKILLs itself mid-run; the resumed selection replays the checkpointed picks and equals an
uninterrupted one. The in-process resume checks are in tests/unit/test_select_engines.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np

from spice_ray.select import select
from spice_ray.testing import sketch_like


def test_resume_after_sigkill_equals_uninterrupted(tmp_path) -> None:
    G = sketch_like(7, n=200, d=12)
    np.save(tmp_path / "G.npy", G)
    ck = tmp_path / "ck"
    code = (
        "import os, signal, sys, numpy as np\n"
        "from spice_ray.select import select\n"
        "G = np.load(sys.argv[1])\n"
        "def on_step(step, index):\n"
        "    if step == 10:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "select(G, 25, lam=0.5, checkpoint_dir=sys.argv[2], checkpoint_every=4, on_step=on_step)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "G.npy"), str(ck)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(json.loads((ck / "picks.json").read_text())["picks"]) == 8
    resumed = select(G, 25, lam=0.5, checkpoint_dir=str(ck), checkpoint_every=4)
    full = select(G, 25, lam=0.5)
    assert resumed.stats["replayed"] == 8
    assert resumed.indices.tolist() == full.indices.tolist() and resumed.logdet == full.logdet
