"""Sketches are a pure function of their inputs across processes: two fresh interpreters
(subprocesses) with different PYTHONHASHSEEDs build the same Kronecker projection and compute the
same per-sample gradient sketches. The in-process sketch checks are in tests/unit/test_sketch.py."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


SKETCH_PROBE = (
    "import torch;from transformers import LlamaConfig, LlamaForCausalLM;from spice_ray.models import add_lora;"
    "from spice_ray.sketch import GradientSketcher;torch.manual_seed(0);"
    "m=add_lora(LlamaForCausalLM(LlamaConfig(vocab_size=97,hidden_size=32,intermediate_size=64,num_hidden_layers=1,"
    "num_attention_heads=2,num_key_value_heads=1)),r=2,alpha=4,target_modules=['q_proj','v_proj'],seed=1).eval();"
    "ids=torch.arange(24).view(2,12)%90+3;s=GradientSketcher(m,dim=32,seed=4)(ids,ids).sketch;"
    "from spice_ray.sketch.projection import KroneckerProjection;import hashlib;"
    "p=KroneckerProjection({'layers.0.q.lora_A':(4,64),'layers.0.q.lora_B':(64,4)},dim=256,seed=11);"
    "print(hashlib.sha256(b''.join(a.numpy().tobytes()+b.numpy().tobytes() for a,b in p.factors.values())).hexdigest());"
    "print(' '.join(f'{v:.7e}' for v in s.flatten().tolist()))"
)


def test_projection_and_sketches_identical_across_processes_and_hash_seeds():
    digests, outs = set(), []
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        res = subprocess.run([sys.executable, "-c", SKETCH_PROBE], env=env, capture_output=True, text=True, check=True)
        digest, values = res.stdout.strip().splitlines()[-2:]
        digests.add(digest)
        outs.append(torch.tensor([float(v) for v in values.split()]))
    assert len(digests) == 1
    assert outs[0].abs().max() > 0
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-9)
