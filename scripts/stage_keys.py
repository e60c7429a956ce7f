"""Every stage's key for a set of configs (upstream results stand-ins derived from the upstream key),
as JSON on stdout: run it against two checkouts and compare, to show a refactor keeps the keys.

    git archive <old commit> spice_ray | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python scripts/stage_keys.py > old.json
    PYTHONPATH=. python scripts/stage_keys.py > new.json && cmp old.json new.json
"""

import json
import sys
import tempfile
from pathlib import Path

from spice_ray.config import load_config
from spice_ray.pipeline import stage_key
from spice_ray.stages import STAGES
from spice_ray.storage import Store
import spice_ray.stages as st

print("module:", st.__file__, file=sys.stderr)
d = Path(tempfile.gettempdir()) / "spice-stage-keys"  # files_key reads mtimes: the same files in both runs
d.mkdir(exist_ok=True)
for fname, text in (("opt.pt", "optimizer state"), ("target.txt", "u1\nu2\n"), ("eval.jsonl", '{"instruction": "a", "output": "b"}\n'),
                    ("corpus.jsonl", '{"instruction": "x", "output": "y"}\n')):
    if not (d / fname).exists():
        (d / fname).write_text(text)
CONFIGS = {
    "default": [],
    "target": ["model.target=builtin:tiny-qwen2-pretrained"],
    "warmup": ["sketch.warmup_fraction=0.1"],
    "warmup_lr": ["sketch.warmup_fraction=0.1", "train.lr=0.001"],
    "lr_only": ["train.lr=0.001"],
    "optstate": [f"sketch.optimizer_state={d/'opt.pt'}"],
    "select_target": [f"select.target={d/'target.txt'}", "select.method=less"],
    "max_tokens": ["corpus.max_tokens=512"],
    "eval_paths": [f"eval.paths=[{d/'eval.jsonl'}]", "eval.holdout=none"],
    "corpus": [f"corpus.paths=[{d/'corpus.jsonl'}]", "corpus.holdout_validation=0.1"],
    "resources": ["sketch.num_workers=2", "train.cpus_per_worker=2", "eval.resources={a: 1}"],
    "proxy_lora": ["model.proxy_lora.r=4", "sketch.dim=256", "select.lam=0.3"],
}
store = Store(tempfile.mkdtemp())
out = {}
for name, overrides in CONFIGS.items():
    cfg = load_config(None, overrides)
    manifests: dict = {}
    keys = {}
    for s in STAGES:
        upstream = {u: manifests[u] for u in s.upstream}
        k = stage_key(s, cfg, upstream, store)
        keys[s.name] = k
        result = {}
        for other in STAGES:
            for need in other.needs:
                up, _, f = need.partition(".")
                if up == s.name:
                    result[f] = f"{s.name}-{f}-{k[:12]}"
        manifests[s.name] = {"key": k, "result": result, "outputs": {}}
    out[name] = keys
print(json.dumps(out, indent=1, sort_keys=True))
